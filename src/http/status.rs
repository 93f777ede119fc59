//! The status pages, server-rendered through askama templates (`templates/`, escaped by
//! construction), no JavaScript, in English or Chinese as `Accept-Language` asks:
//! `GET /` (recent jobs with progress, mirrored images with their trusted digests and pull lines,
//! open drift, a search box) and `GET /ui/images/{name}` (one image: each tag with its platforms
//! and their digests, signatures and other referrers, history and drift).

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, AppState, rfc3339};
use crate::reference::ImageRef;
use crate::store::{Drift, DriftKind, Record};

/// The words of the pages in one language.
#[derive(Debug)]
pub struct Words {
    lang: &'static str,
    home: &'static str,
    metrics: &'static str,
    intro_before: &'static str,
    intro_after: &'static str,
    search_placeholder: &'static str,
    search: &'static str,
    mirrored_images: &'static str,
    matching: &'static str,
    none_yet: &'static str,
    source: &'static str,
    trusted_digest: &'static str,
    pull: &'static str,
    verified: &'static str,
    drift: &'static str,
    drift_intro: &'static str,
    details: &'static str,
    mirror: &'static str,
    what: &'static str,
    mirrored: &'static str,
    policy: &'static str,
    job: &'static str,
    last_seen: &'static str,
    upstream_moved: &'static str,
    upstream_gone: &'static str,
    missing: &'static str,
    recent_jobs: &'static str,
    state: &'static str,
    progress: &'static str,
    updated: &'static str,
    last_error: &'static str,
    blobs: &'static str,
    states: [&'static str; 4],
    image: &'static str,
    never_mirrored: &'static str,
    tag: &'static str,
    by_digest: &'static str,
    size: &'static str,
    requested_by: &'static str,
    in_sync: &'static str,
    platforms: &'static str,
    platform: &'static str,
    single_platform: &'static str,
    digest: &'static str,
    referrers: &'static str,
    no_referrers: &'static str,
    kind: &'static str,
    refers_to: &'static str,
    kinds: [&'static str; 4],
    history: &'static str,
    default_policy: &'static str,
}

const EN: Words = Words {
    lang: "en",
    home: "all images",
    metrics: "metrics",
    intro_before: "Mirrors go under ",
    intro_after: ". Every image below was copied digest-exact and verified on the mirror: pull it by the digest shown.",
    search_placeholder: "image name, e.g. kaniko-project/executor",
    search: "Search",
    mirrored_images: "Mirrored images",
    matching: "matching",
    none_yet: "None yet.",
    source: "source",
    trusted_digest: "trusted digest",
    pull: "pull",
    verified: "verified",
    drift: "Drift",
    drift_intro: "Found by drift watch and not yet resolved",
    details: "details",
    mirror: "mirror",
    what: "what",
    mirrored: "mirrored",
    policy: "policy",
    job: "job",
    last_seen: "last seen",
    upstream_moved: "upstream moved to",
    upstream_gone: "gone upstream",
    missing: "missing on the mirror:",
    recent_jobs: "Recent jobs",
    state: "state",
    progress: "progress",
    updated: "updated",
    last_error: "last error",
    blobs: "blobs",
    states: ["queued", "running", "succeeded", "failed"],
    image: "Image",
    never_mirrored: "has never been mirrored here.",
    tag: "tag",
    by_digest: "by digest only",
    size: "size",
    requested_by: "requested by",
    in_sync: "In sync: no open drift.",
    platforms: "Platforms",
    platform: "platform",
    single_platform: "A single-platform image: its digest above is the platform's.",
    digest: "digest",
    referrers: "Signatures and other referrers",
    no_referrers: "None copied.",
    kind: "kind",
    refers_to: "refers to",
    kinds: [
        "cosign signature",
        "cosign attestation",
        "SBOM",
        "referrer (OCI 1.1)",
    ],
    history: "History",
    default_policy: "service default",
};

const ZH: Words = Words {
    lang: "zh-CN",
    home: "全部镜像",
    metrics: "指标",
    intro_before: "镜像都存放在 ",
    intro_after: " 之下。下列每个镜像都按摘要原样复制，并已在镜像仓库上校验：请按所示摘要拉取。",
    search_placeholder: "镜像名，例如 kaniko-project/executor",
    search: "搜索",
    mirrored_images: "已镜像的镜像",
    matching: "匹配",
    none_yet: "暂无。",
    source: "来源",
    trusted_digest: "可信摘要",
    pull: "拉取",
    verified: "校验时间",
    drift: "漂移",
    drift_intro: "漂移检查发现、尚未解决的问题",
    details: "详情",
    mirror: "镜像仓库",
    what: "情况",
    mirrored: "已镜像的摘要",
    policy: "策略",
    job: "任务",
    last_seen: "最近发现",
    upstream_moved: "上游标签已改指向",
    upstream_gone: "上游已删除",
    missing: "镜像仓库缺失：",
    recent_jobs: "最近的任务",
    state: "状态",
    progress: "进度",
    updated: "更新时间",
    last_error: "最近的错误",
    blobs: "个数据块",
    states: ["排队中", "运行中", "成功", "失败"],
    image: "镜像",
    never_mirrored: "从未在此镜像过。",
    tag: "标签",
    by_digest: "仅按摘要",
    size: "大小",
    requested_by: "请求者",
    in_sync: "已同步：没有未解决的漂移。",
    platforms: "平台",
    platform: "平台",
    single_platform: "单平台镜像：上面的摘要就是该平台的摘要。",
    digest: "摘要",
    referrers: "签名及其他引用制品",
    no_referrers: "未复制任何引用制品。",
    kind: "类型",
    refers_to: "指向",
    kinds: [
        "cosign 签名",
        "cosign 证明",
        "SBOM（软件物料清单）",
        "引用制品（OCI 1.1）",
    ],
    history: "历史",
    default_policy: "服务默认",
};

/// The language `Accept-Language` prefers among those the pages have (English when none).
pub fn words(headers: &HeaderMap) -> &'static Words {
    let Some(accept) = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
    else {
        return &EN;
    };
    let mut best: Option<(f32, &'static Words)> = None;
    for part in accept.split(',') {
        let mut it = part.split(';');
        let tag = it.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = it
            .find_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .map(|q| q.parse().unwrap_or(0.0))
            })
            .unwrap_or(1.0f32);
        let w = if tag == "zh" || tag.starts_with("zh-") {
            &ZH
        } else if tag == "en" || tag.starts_with("en-") || tag == "*" {
            &EN
        } else {
            continue;
        };
        if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) {
            best = Some((q, w));
        }
    }
    best.map(|(_, w)| w).unwrap_or(&EN)
}

/// Renders `page` as an HTML response with `status`.
fn html(status: StatusCode, page: &impl Template, t: &Words) -> Response {
    match page.render() {
        Ok(body) => (
            status,
            [
                (header::CONTENT_LANGUAGE, t.lang),
                (header::VARY, "Accept-Language"),
            ],
            Html(body),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering a status page failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The search box.
#[derive(Debug, Deserialize)]
pub struct Search {
    q: Option<String>,
}

struct ImageRow {
    repo: String,
    source: String,
    digest: String,
    pull: String,
    verified: String,
}

struct DriftRow {
    mirror: String,
    what: &'static str,
    detail: String,
    recorded: String,
    policy: String,
    job: Option<i64>,
    last_seen: String,
}

struct JobRow {
    id: i64,
    state: String,
    state_words: &'static str,
    source: String,
    bytes_total: i64,
    bytes_done: i64,
    blobs_done: i64,
    blobs_total: i64,
    updated: String,
    last_error: String,
}

#[derive(Template)]
#[template(path = "status.html")]
struct StatusPage<'a> {
    t: &'a Words,
    target: String,
    q: &'a str,
    images: Vec<ImageRow>,
    drift: Vec<DriftRow>,
    jobs: Vec<JobRow>,
}

fn drift_row(t: &'static Words, d: &Drift) -> DriftRow {
    let (what, detail) = match d.kind {
        DriftKind::UpstreamMoved => (
            t.upstream_moved,
            d.observed_digest.clone().unwrap_or_default(),
        ),
        DriftKind::UpstreamGone => (t.upstream_gone, String::new()),
        DriftKind::Missing => (
            t.missing,
            d.missing
                .as_ref()
                .map(|m| serde_json::to_string(m).unwrap_or_default())
                .unwrap_or_default(),
        ),
    };
    DriftRow {
        mirror: format!(
            "{}{}",
            d.mirror_repo,
            d.mirror_tag
                .as_deref()
                .map(|t| format!(":{t}"))
                .unwrap_or_default()
        ),
        what,
        detail,
        recorded: d.recorded_digest.clone(),
        policy: d.policy.to_string(),
        job: d.job_id,
        last_seen: rfc3339(d.last_seen_at),
    }
}

fn state_words(t: &'static Words, state: &str) -> &'static str {
    match state {
        "queued" => t.states[0],
        "running" => t.states[1],
        "succeeded" => t.states[2],
        "failed" => t.states[3],
        _ => "?",
    }
}

/// `GET /?q=…`.
#[utoipa::path(get, path = "/", tag = "status",
    params(("q" = Option<String>, Query, description = "only images whose source or mirror name contains this")),
    responses((status = 200, description = "the status page (HTML; Chinese when Accept-Language asks for zh)", content_type = "text/html")))]
pub async fn page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(search): Query<Search>,
) -> Result<Response, ApiError> {
    state.authenticate_read(&headers)?;
    let t = words(&headers);
    let q = search.q.as_deref().map(str::trim).unwrap_or("");
    let jobs = state.store.list(None, 20, None).await?;
    let images = state
        .store
        .latest((!q.is_empty()).then_some(q), 100)
        .await?;
    let drift = state.store.list_drift(false, 50, None).await?;
    let page = StatusPage {
        t,
        target: state.config.targets.repos(),
        q,
        images: images
            .iter()
            .map(|r| ImageRow {
                repo: r.source_repo.clone(),
                source: match &r.tag {
                    Some(t) => format!("{}:{t}", r.source_repo),
                    None => r.source_repo.clone(),
                },
                digest: r.source_digest.clone(),
                pull: pull_line(r),
                verified: rfc3339(r.verified_at),
            })
            .collect(),
        drift: drift.iter().map(|d| drift_row(t, d)).collect(),
        jobs: jobs
            .iter()
            .map(|j| JobRow {
                id: j.id,
                state: j.state.to_string(),
                state_words: state_words(t, &j.state.to_string()),
                source: j.source.clone(),
                bytes_total: j.bytes_total,
                bytes_done: j.bytes_done,
                blobs_done: j.blobs_done,
                blobs_total: j.blobs_total,
                updated: rfc3339(j.updated_at),
                last_error: j.last_error.clone().unwrap_or_default(),
            })
            .collect(),
    };
    Ok(html(StatusCode::OK, &page, t))
}

/// `mirror:tag@digest`, or `mirror@digest` for a digest-only mirror.
fn pull_line(r: &Record) -> String {
    match r.mirror_tag.as_deref().or(r.tag.as_deref()) {
        Some(t) => format!("{}:{t}@{}", r.mirror_repo, r.mirror_digest),
        None => format!("{}@{}", r.mirror_repo, r.mirror_digest),
    }
}

struct PlatformRow {
    platform: String,
    digest: String,
}

struct ReferrerRow {
    kind: &'static str,
    digest: String,
    tag: Option<String>,
    subject: String,
}

struct HistoryRow {
    digest: String,
    verified: String,
    job: i64,
}

struct Entry {
    tag: Option<String>,
    digest: String,
    pull: String,
    verified: String,
    policy: String,
    size: String,
    requested_by: String,
    platforms: Vec<PlatformRow>,
    referrers: Vec<ReferrerRow>,
    history: Vec<HistoryRow>,
    drift: Vec<DriftRow>,
}

#[derive(Template)]
#[template(path = "image.html")]
struct ImagePage<'a> {
    t: &'a Words,
    name: String,
    source: String,
    mirror: String,
    entries: Vec<Entry>,
}

fn entry(t: &'static Words, current: &Record, history: &[&Record], drift: &[Drift]) -> Entry {
    let manifests = &current.manifests;
    let platforms = manifests
        .iter()
        .filter_map(|m| {
            let p = m.get("platform")?.as_str()?;
            (!p.starts_with("unknown/")).then(|| PlatformRow {
                platform: p.to_string(),
                digest: m["digest"].as_str().unwrap_or("").to_string(),
            })
        })
        .collect();
    let referrers = manifests
        .iter()
        .filter_map(|m| {
            let subject = m.get("referrer_of")?.as_str()?.to_string();
            let tag = m.get("tag").and_then(|v| v.as_str()).map(String::from);
            let kind = match tag.as_deref() {
                Some(x) if x.ends_with(".sig") => t.kinds[0],
                Some(x) if x.ends_with(".att") => t.kinds[1],
                Some(x) if x.ends_with(".sbom") => t.kinds[2],
                _ => t.kinds[3],
            };
            Some(ReferrerRow {
                kind,
                digest: m["digest"].as_str().unwrap_or("").to_string(),
                tag,
                subject,
            })
        })
        .collect();
    let mirror_tag = current.mirror_tag.as_deref().or(current.tag.as_deref());
    let v = &current.requested_by;
    let requested_by = match (v["kind"].as_str(), v["name"].as_str()) {
        (Some(k), Some(n)) => format!("{k}: {n}"),
        (Some(k), None) => k.to_string(),
        _ => v.to_string(),
    };
    Entry {
        tag: current.tag.clone(),
        digest: current.source_digest.clone(),
        pull: pull_line(current),
        verified: rfc3339(current.verified_at),
        policy: current
            .policy
            .map(|p| p.to_string())
            .unwrap_or_else(|| t.default_policy.to_string()),
        size: crate::cmd::human_bytes(current.size_bytes.max(0) as u64),
        requested_by,
        platforms,
        referrers,
        history: history
            .iter()
            .map(|r| HistoryRow {
                digest: r.source_digest.clone(),
                verified: rfc3339(r.verified_at),
                job: r.job_id,
            })
            .collect(),
        drift: drift
            .iter()
            .filter(|d| {
                d.mirror_repo == current.mirror_repo
                    && d.mirror_tag.as_deref() == mirror_tag
                    && (d.mirror_tag.is_some() || d.recorded_digest == current.source_digest)
            })
            .map(|d| drift_row(t, d))
            .collect(),
    }
}

/// `GET /ui/images/{name}`: one image's page.
#[utoipa::path(get, path = "/ui/images/{*name}", tag = "status",
    params(("name" = String, Path, pattern = "^(?:[a-z][a-z0-9]{0,15}(?:[.-][a-z0-9]{1,14}){0,3}(?::[1-9][0-9]{0,3})?/)?[a-z0-9]+(?:[_-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*){0,3}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})?$", max_length = 200, description = "source or mirror repository")),
    responses((status = 200, description = "the image's page (HTML): tags, platforms with their digests, referrers and signatures, history, drift", content_type = "text/html"),
        (status = 400, description = "not an image name (the error envelope, saying which part)"),
        (status = 404, description = "never mirrored (an HTML page saying so)", content_type = "text/html")))]
pub async fn image(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    state.authenticate_read(&headers)?;
    let t = words(&headers);
    let reference = ImageRef::parse(&name)
        .map_err(|e| ApiError::BadRequest(format!("{name:?} is not an image name: {e}")))?;
    let repo = reference.repo_name();
    let records = state.store.by_repo(&repo).await?;
    let drift = state.store.open_drift(&repo).await?;
    // Newest first: the first record of each tag (or digest) is what it is now.
    let mut keys: Vec<(Option<String>, String)> = Vec::new();
    for r in &records {
        let key = match &r.tag {
            Some(tag) => (Some(tag.clone()), String::new()),
            None => (None, r.source_digest.clone()),
        };
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys.sort();
    let entries = keys
        .iter()
        .map(|(tag, digest)| {
            let history: Vec<&Record> = records
                .iter()
                .filter(|r| match tag {
                    Some(tag) => r.tag.as_ref() == Some(tag),
                    None => r.tag.is_none() && &r.source_digest == digest,
                })
                .collect();
            entry(t, history[0], &history, &drift)
        })
        .collect::<Vec<_>>();
    let page = ImagePage {
        t,
        name: repo,
        source: records
            .first()
            .map(|r| r.source_repo.clone())
            .unwrap_or_default(),
        mirror: records
            .first()
            .map(|r| r.mirror_repo.clone())
            .unwrap_or_default(),
        entries,
    };
    let status = if page.entries.is_empty() {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    Ok(html(status, &page, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lang(accept: Option<&str>) -> &'static str {
        let mut h = HeaderMap::new();
        if let Some(a) = accept {
            h.insert(header::ACCEPT_LANGUAGE, a.parse().unwrap());
        }
        words(&h).lang
    }

    #[test]
    fn accept_language_picks_the_preferred_language_the_pages_have() {
        assert_eq!(lang(None), "en");
        assert_eq!(lang(Some("zh-CN,zh;q=0.9,en;q=0.8")), "zh-CN");
        assert_eq!(lang(Some("zh")), "zh-CN");
        assert_eq!(lang(Some("ZH-tw")), "zh-CN");
        assert_eq!(lang(Some("en-US,en;q=0.9,zh;q=0.5")), "en");
        assert_eq!(lang(Some("fr-FR,zh;q=0.4")), "zh-CN");
        assert_eq!(lang(Some("fr-FR,de")), "en");
        assert_eq!(lang(Some("zh;q=0,en;q=0.1")), "en");
        assert_eq!(lang(Some("en;q=0.2, zh-Hans;q=0.7")), "zh-CN");
        assert_eq!(lang(Some("zhx, *")), "en");
    }
}
