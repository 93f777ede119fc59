//! The declarative mirror list: a YAML file naming images and which of their tags to keep
//! mirrored (explicit tags, a tag regex, a semver range, the newest N of those, or one digest).
//! Parsing checks everything up front and reports every problem with its `file:line:column`.
//!
//! ```yaml
//! defaults:                 # optional; every entry inherits these
//!   policy: follow          # drift policy: follow | pin
//!   referrers: true         # copy signatures and attestations too
//! images:
//!   - source: registry.k8s.io/pause
//!     tags: ["3.9", "3.10"]
//!   - source: docker.io/library/nginx
//!     tag_regex: '1\.27\.[0-9]+-alpine'   # must match the whole tag
//!     latest: 2                           # only the newest 2 matches
//!   - source: quay.io/prometheus/node-exporter
//!     semver: ">=1.8.0, <2"               # v-prefixed tags count too
//!     policy: pin
//!   - source: registry.k8s.io/coredns/coredns:v1.11.1   # one tag
//!   - source: ghcr.io/acme/tool@sha256:…                # one digest
//!     targets: [home]       # only these of MIRROR_TARGETS (default: every target)
//! ```
//!
//! Selection rules: explicit tags (in `tags:` or the source) are always selected, listed upstream
//! or not (a missing one is reported by the sync). `tag_regex` must match the whole tag. `semver`
//! takes tags that are full versions (`MAJOR.MINOR.PATCH`, optionally `-pre`, after one leading
//! `v`) in the range; `1.27` or `18` are not versions (such tags are usually moving aliases of the
//! newest patch: name them in `tags` or match them with `tag_regex`), and a prerelease is in a
//! range only when the range names a prerelease of the same `MAJOR.MINOR.PATCH` (the semver
//! crate's rule, as Cargo's). With both `tag_regex` and `semver`, a tag must match both. `latest:
//! N` keeps the N newest of those matches: by version, then tags that are not versions by name,
//! descending. The result is sorted by name, without duplicates.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::LazyLock;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::{LoadError, LoaderOptions, Node, Span};

use crate::drift::Policy;
use crate::reference::{ImageRef, ReferenceError};

/// Keys of an entry under `images`.
const ENTRY_KEYS: [&str; 8] = [
    "source",
    "tags",
    "tag_regex",
    "semver",
    "latest",
    "policy",
    "referrers",
    "targets",
];
/// Keys of `defaults`.
const DEFAULT_KEYS: [&str; 2] = ["policy", "referrers"];
/// Keys at the top.
const TOP_KEYS: [&str; 2] = ["defaults", "images"];
/// Problems reported at most (the rest are counted).
const MAX_PROBLEMS: usize = 50;

/// The parsed list, defaults applied.
#[derive(Debug, Clone, Default)]
pub struct MirrorList {
    pub entries: Vec<Entry>,
}

/// One image to keep mirrored.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Line of the entry in the file (1-based), for messages.
    pub line: usize,
    /// The repository, with the tag or digest when the entry names exactly one.
    pub source: ImageRef,
    /// Tags always selected.
    pub tags: Vec<String>,
    /// Tags matching this (the whole tag: it is anchored) are selected; with `semver` too, a tag
    /// must match both.
    pub tag_regex: Option<regex::Regex>,
    /// Tags that are full versions in this range (after one leading `v`) are selected; with
    /// `tag_regex` too, a tag must match both.
    pub semver: Option<semver::VersionReq>,
    /// Of the regex and semver matches, only the newest this many.
    pub latest: Option<usize>,
    /// What drift watch does when a selected tag moves upstream.
    pub policy: Policy,
    /// Whether signatures, attestations and SBOMs are copied with each image.
    pub referrers: bool,
    /// The named targets (`MIRROR_TARGETS`) it is mirrored to; none: every target.
    pub targets: Option<Vec<String>>,
}

impl Entry {
    /// Whether the source's tag list is needed to know which tags this entry selects.
    pub fn needs_listing(&self) -> bool {
        self.tag_regex.is_some() || self.semver.is_some()
    }

    /// The tags this entry selects from `available` (the source's tags): explicit tags always
    /// (a missing one is reported when it is copied), plus regex and semver matches (the newest
    /// `latest` of those); sorted, without duplicates. Empty for a digest entry. Names in
    /// `available` that are not valid tags are never selected.
    pub fn select(&self, available: &[String]) -> Vec<String> {
        let mut out: Vec<String> = self.tags.clone();
        if let Some(t) = self.source.tag()
            && self.source.digest().is_none()
        {
            out.push(t.to_string());
        }
        if self.needs_listing() {
            let mut matched: Vec<&String> = available
                .iter()
                .filter(|t| check_tag(t).is_ok())
                .filter(|t| self.tag_regex.as_ref().is_none_or(|r| r.is_match(t)))
                .filter(|t| {
                    self.semver
                        .as_ref()
                        .is_none_or(|req| version(t).is_some_and(|v| req.matches(&v)))
                })
                .collect();
            if let Some(n) = self.latest {
                matched.sort_by(|a, b| newer_first(a, b));
                matched.truncate(n);
            }
            out.extend(matched.into_iter().cloned());
        }
        out.sort();
        out.dedup();
        out
    }
}

/// Whether `tag` is a valid tag (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`), with the reference
/// parser's own message when not.
fn check_tag(tag: &str) -> Result<(), ReferenceError> {
    static ANY: LazyLock<ImageRef> =
        LazyLock::new(|| ImageRef::parse("x").expect("a constant reference"));
    ANY.clone().try_with_tag(Some(tag.to_string())).map(drop)
}

/// A tag as a version: `1.2.3`, `v1.2.3`, `1.2.3-rc.1` (not `1.2`).
fn version(tag: &str) -> Option<semver::Version> {
    semver::Version::parse(tag.strip_prefix('v').unwrap_or(tag)).ok()
}

/// Newest first: by version when both are versions (versions before other tags), else by name
/// (descending).
fn newer_first(a: &str, b: &str) -> std::cmp::Ordering {
    match (version(a), version(b)) {
        (Some(x), Some(y)) => y.cmp(&x).then_with(|| b.cmp(a)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => b.cmp(a),
    }
}

/// Why a mirror list was refused: every problem found, each with its place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListError {
    pub file: String,
    /// (line, column, what is wrong and what to do), in file order.
    pub problems: Vec<(usize, usize, String)>,
    /// Problems found beyond those listed.
    pub more: usize,
}

impl fmt::Display for ListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (line, col, msg)) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match (line, col) {
                (0, _) => write!(f, "{}: {msg}", self.file)?,
                (l, 0) => write!(f, "{}:{l}: {msg}", self.file)?,
                (l, c) => write!(f, "{}:{l}:{c}: {msg}", self.file)?,
            }
        }
        if self.more > 0 {
            write!(f, "\n{}: … and {} more problem(s)", self.file, self.more)?;
        }
        Ok(())
    }
}

impl std::error::Error for ListError {}

/// Reads and parses the mirror list at `path`.
pub fn load(path: &Path) -> Result<MirrorList, ListError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ListError {
        file: name.clone(),
        problems: vec![(0, 0, format!("cannot read the mirror list: {e}"))],
        more: 0,
    })?;
    parse(&name, &text)
}

/// Collects problems with their places.
struct Problems {
    list: Vec<(usize, usize, String)>,
}

impl Problems {
    /// A problem with a whole entry: its line (a mapping's span starts at its first value).
    fn line(&mut self, span: &Span, msg: String) {
        self.list.push((line_of(span), 0, msg));
    }

    fn at(&mut self, span: &Span, msg: String) {
        let (line, col) = span
            .start()
            .map(|m| (m.line(), m.column()))
            .unwrap_or((0, 0));
        self.list.push((line, col, msg));
    }
}

fn line_of(span: &Span) -> usize {
    span.start().map(|m| m.line()).unwrap_or(0)
}

fn unknown_keys(map: &MarkedMappingNode, known: &[&str], what: &str, p: &mut Problems) {
    for key in map.keys() {
        if !known.contains(&key.as_str()) {
            p.at(
                key.span(),
                format!(
                    "unknown key {:?} in {what}; the keys are: {}",
                    key.as_str(),
                    known.join(", ")
                ),
            );
        }
    }
}

/// Where `key` is written in `map` (a mapping's own span starts at its first value, not its key).
fn key_span<'a>(map: &'a MarkedMappingNode, key: &str, or: &'a Span) -> &'a Span {
    map.keys()
        .find(|k| k.as_str() == key)
        .map_or(or, |k| k.span())
}

fn scalar<'a>(node: &'a Node, key: &str, p: &mut Problems) -> Option<&'a MarkedScalarNode> {
    let s = node.as_scalar();
    if s.is_none() {
        p.at(node.span(), format!("{key} must be a single value"));
    }
    s
}

fn policy(node: &Node, p: &mut Problems) -> Option<Policy> {
    let s = scalar(node, "policy", p)?;
    match s.as_str().parse() {
        Ok(v) => Some(v),
        Err(e) => {
            p.at(s.span(), e);
            None
        }
    }
}

fn boolean(node: &Node, key: &str, p: &mut Problems) -> Option<bool> {
    let s = scalar(node, key, p)?;
    let b = s.as_bool();
    if b.is_none() {
        p.at(
            s.span(),
            format!("{key} must be true or false, not {:?}", s.as_str()),
        );
    }
    b
}

/// Parses a mirror list; `file` names it in messages.
pub fn parse(file: &str, text: &str) -> Result<MirrorList, ListError> {
    let mut p = Problems { list: Vec::new() };
    let fail = |mut list: Vec<(usize, usize, String)>| {
        list.sort_by_key(|(l, c, _)| (*l, *c));
        let more = list.len().saturating_sub(MAX_PROBLEMS);
        list.truncate(MAX_PROBLEMS);
        ListError {
            file: file.to_string(),
            problems: list,
            more,
        }
    };
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .toplevel_mapping();
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(fail(vec![(
            0,
            0,
            "the mirror list is empty; it needs an `images:` list".into(),
        )]));
    }
    if let Some(line) = second_document(text) {
        return Err(fail(vec![(
            line,
            1,
            "a second YAML document starts here (`---`); the mirror list is one document: put every entry under its one `images:`".into(),
        )]));
    }
    let root = match marked_yaml::parse_yaml_with_options(0, text, options) {
        Ok(root) => root,
        Err(e) => return Err(fail(vec![yaml_problem(&e)])),
    };
    let Some(top) = root.as_mapping() else {
        return Err(fail(vec![(
            1,
            1,
            "the top must be a mapping with `images:`".into(),
        )]));
    };
    unknown_keys(top, &TOP_KEYS, "the top level", &mut p);
    let mut default_policy = Policy::default();
    let mut default_referrers = true;
    // `defaults:` with nothing under it (say, every line commented out) is no defaults.
    let nothing = |n: &&Node| {
        n.as_scalar()
            .is_some_and(|s| matches!(s.as_str(), "" | "~" | "null"))
    };
    if let Some(node) = top.get_node("defaults").filter(|n| !nothing(n)) {
        match node.as_mapping() {
            Some(d) => {
                unknown_keys(d, &DEFAULT_KEYS, "defaults", &mut p);
                if let Some(n) = d.get_node("policy") {
                    default_policy = policy(n, &mut p).unwrap_or_default();
                }
                if let Some(n) = d.get_node("referrers") {
                    default_referrers = boolean(n, "referrers", &mut p).unwrap_or(true);
                }
            }
            None => p.at(
                key_span(top, "defaults", node.span()),
                "defaults must be a mapping (policy, referrers)".into(),
            ),
        }
    }
    let mut entries = Vec::new();
    match top.get_node("images") {
        None => p.at(
            root.span(),
            "there is no `images:` list; add one with an entry per image".into(),
        ),
        Some(node) => match node.as_sequence() {
            None => p.at(
                key_span(top, "images", node.span()),
                "images must be a list of entries (`- source: …`)".into(),
            ),
            Some(items) => {
                let mut seen: HashMap<String, usize> = HashMap::new();
                // `repository:tag` named explicitly (in `tags:` or the source) → line.
                let mut named: HashMap<String, usize> = HashMap::new();
                for item in items.iter() {
                    let Some(e) = entry(item, default_policy, default_referrers, &mut p) else {
                        continue;
                    };
                    let key = e.source.to_string();
                    if let Some(first) = seen.insert(key.clone(), e.line) {
                        p.line(
                            item.span(),
                            format!(
                                "{key} is listed twice (first on line {first}); merge the two entries"
                            ),
                        );
                        continue;
                    }
                    let explicit = e
                        .tags
                        .iter()
                        .map(String::as_str)
                        .chain(e.source.tag().filter(|_| e.source.digest().is_none()));
                    let mut again = Vec::new();
                    for tag in explicit {
                        let name = format!("{}:{tag}", e.source.repo_name());
                        if let Some(&first) = named.get(&name) {
                            again.push(format!("{name} (line {first})"));
                        } else {
                            named.insert(name, e.line);
                        }
                    }
                    if !again.is_empty() {
                        p.line(
                            item.span(),
                            format!(
                                "already named on another line: {}; name each tag in one entry",
                                again.join(", ")
                            ),
                        );
                    }
                    entries.push(e);
                }
            }
        },
    }
    if p.list.is_empty() {
        Ok(MirrorList { entries })
    } else {
        Err(fail(p.list))
    }
}

/// The line of a `---` that starts a second document (the loader reads the first only).
fn second_document(text: &str) -> Option<usize> {
    let mut content = false;
    for (i, line) in text.lines().enumerate() {
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']));
        if marker && content {
            return Some(i + 1);
        }
        let t = line.trim();
        content |= !marker && !t.is_empty() && !t.starts_with('#') && !t.starts_with('%');
    }
    None
}

/// The loader's error as a problem at its place.
fn yaml_problem(e: &LoadError) -> (usize, usize, String) {
    let place = |s: &Span| s.start().map(|m| (m.line(), m.column())).unwrap_or((0, 0));
    let (at, msg) = match e {
        LoadError::DuplicateKey(d) => (
            place(d.key.span()),
            format!(
                "key {:?} is given twice in the same mapping (first on line {}); keep one",
                d.key.as_str(),
                place(d.prev_key.span()).0
            ),
        ),
        LoadError::UnexpectedAnchor(m) => (
            (m.line(), m.column()),
            "YAML anchors and aliases (`&name`, `*name`) are not supported; write the value out"
                .into(),
        ),
        LoadError::UnexpectedTag(m) => (
            (m.line(), m.column()),
            "YAML tags (`!name`) are not supported; write a plain value".into(),
        ),
        LoadError::MappingKeyMustBeScalar(m) => (
            (m.line(), m.column()),
            "a key must be a plain word such as `source`".into(),
        ),
        LoadError::TopLevelMustBeMapping(m) | LoadError::TopLevelMustBeSequence(m) => (
            (m.line(), m.column()),
            "the top must be a mapping with `images:`".into(),
        ),
        LoadError::ScanError(m, _) => {
            // The message after the loader's own `line:column: `.
            let msg = e.to_string();
            let what = msg.split_once(": ").map_or(msg.as_str(), |(_, w)| w);
            (
                (m.line(), m.column()),
                format!("not valid YAML here: {what}"),
            )
        }
    };
    (at.0, at.1, msg)
}

fn entry(
    item: &Node,
    default_policy: Policy,
    default_referrers: bool,
    p: &mut Problems,
) -> Option<Entry> {
    let before = p.list.len();
    let Some(map) = item.as_mapping() else {
        p.line(
            item.span(),
            "an entry must be a mapping starting with `source:`".into(),
        );
        return None;
    };
    unknown_keys(map, &ENTRY_KEYS, "an image entry", p);
    let line = line_of(item.span());
    let source = match map.get_node("source") {
        None => {
            p.line(
                item.span(),
                "this entry has no `source:`; name the image, e.g. `source: registry.k8s.io/pause`"
                    .into(),
            );
            None
        }
        Some(n) => scalar(n, "source", p).and_then(|s| match ImageRef::parse(s.as_str()) {
            Ok(r) => Some(r),
            Err(e) => {
                p.at(
                    s.span(),
                    format!(
                        "source {:?} is not a valid image reference: {e}",
                        s.as_str()
                    ),
                );
                None
            }
        }),
    };
    let mut tags = Vec::new();
    if let Some(n) = map.get_node("tags") {
        match n.as_sequence() {
            Some(items) if !items.is_empty() => {
                for t in items.iter() {
                    if let Some(s) = scalar(t, "each tag", p) {
                        match check_tag(s.as_str()) {
                            Err(e) => p.at(s.span(), format!("{e}")),
                            Ok(()) if tags.iter().any(|x| x == s.as_str()) => p.at(
                                s.span(),
                                format!("tag {:?} is listed twice; keep one", s.as_str()),
                            ),
                            Ok(()) => tags.push(s.as_str().to_string()),
                        }
                    }
                }
            }
            _ => p.at(
                n.span(),
                "tags must be a non-empty list, e.g. `tags: [\"1.0\", \"1.1\"]`".into(),
            ),
        }
    }
    let targets = map.get_node("targets").map(|n| {
        let mut names: Vec<String> = Vec::new();
        match n.as_sequence() {
            Some(items) if !items.is_empty() => {
                for t in items.iter() {
                    if let Some(s) = scalar(t, "each target", p) {
                        if names.iter().any(|x| x == s.as_str()) {
                            p.at(
                                s.span(),
                                format!("target {:?} is listed twice; keep one", s.as_str()),
                            );
                        } else {
                            names.push(s.as_str().to_string());
                        }
                    }
                }
            }
            _ => p.at(
                n.span(),
                "targets must be a non-empty list of target names (MIRROR_TARGETS), e.g. `targets: [ghcr, home]`; leave it out for every target".into(),
            ),
        }
        names
    });
    let tag_regex = map.get_node("tag_regex").and_then(|n| {
        let s = scalar(n, "tag_regex", p)?;
        if s.as_str().is_empty() {
            p.at(
                s.span(),
                "tag_regex is empty, which matches no tag; write the pattern, e.g. '1\\.27\\.[0-9]+'"
                    .into(),
            );
            return None;
        }
        match regex::Regex::new(&format!("^(?:{})$", s.as_str())) {
            Ok(r) => Some(r),
            Err(e) => {
                p.at(
                    s.span(),
                    format!(
                        "tag_regex {:?} is not a valid regular expression: {}",
                        s.as_str(),
                        e.to_string().lines().last().unwrap_or("")
                    ),
                );
                None
            }
        }
    });
    let semver = map.get_node("semver").and_then(|n| {
        let s = scalar(n, "semver", p)?;
        match semver::VersionReq::parse(s.as_str()) {
            Ok(r) => Some(r),
            Err(e) => {
                p.at(
                    s.span(),
                    format!(
                        "semver {:?} is not a version range ({e}); write it like \">=1.8.0, <2\"",
                        s.as_str()
                    ),
                );
                None
            }
        }
    });
    let latest = map.get_node("latest").and_then(|n| {
        let s = scalar(n, "latest", p)?;
        match s.as_str().parse::<usize>() {
            Ok(v) if v > 0 => Some(v),
            _ => {
                p.at(
                    s.span(),
                    format!(
                        "latest must be a whole number above 0, not {:?}",
                        s.as_str()
                    ),
                );
                None
            }
        }
    });
    let named_policy = map.get_node("policy").and_then(|n| policy(n, p));
    let referrers = map
        .get_node("referrers")
        .and_then(|n| boolean(n, "referrers", p))
        .unwrap_or(default_referrers);
    let source = source?;
    // A digest names one image: its entry keeps it unless it says `policy: follow`.
    let policy = named_policy.unwrap_or(if source.digest().is_some() {
        Policy::Pin
    } else {
        default_policy
    });
    let selects = map.get_node("tags").is_some()
        || map.get_node("tag_regex").is_some()
        || map.get_node("semver").is_some();
    if source.digest().is_some() && selects {
        p.line(
            item.span(),
            format!(
                "{source} names a digest, which is one image; drop tags/tag_regex/semver, or the digest"
            ),
        );
    } else if source.tag().is_some() && selects {
        p.line(
            item.span(),
            format!(
                "{source} names a tag and also tags/tag_regex/semver; name tags in one place only"
            ),
        );
    } else if source.tag().is_none() && source.digest().is_none() && !selects {
        p.line(
            item.span(),
            format!(
                "{} says no tags; add `tags:`, `tag_regex:` or `semver:`, or name one tag or digest in the source",
                source.repo_name()
            ),
        );
    }
    if latest.is_some() && map.get_node("tag_regex").is_none() && map.get_node("semver").is_none() {
        p.at(
            map.get_node("latest")
                .map(Node::span)
                .unwrap_or(item.span()),
            "latest keeps the newest matches of tag_regex or semver; add one of them".into(),
        );
    }
    if p.list.len() != before {
        return None;
    }
    Some(Entry {
        line,
        source,
        tags,
        tag_regex,
        semver,
        latest,
        policy,
        referrers,
        targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const GOOD: &str = r#"# a comment
defaults:
  policy: pin
  referrers: false
images:
  - source: registry.k8s.io/pause
    tags: ["3.9", "3.10"]
  - source: nginx
    tag_regex: '1\.27\.[0-9]+-alpine'
    latest: 2
    policy: follow
  - source: quay.io/prometheus/node-exporter
    semver: ">=1.8.0, <2"
    referrers: true
  - source: registry.k8s.io/coredns/coredns:v1.11.1
  - source: ghcr.io/acme/tool@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
"#;

    #[test]
    fn an_entry_names_its_targets() {
        let list = parse(
            "m.yaml",
            "images:\n  - source: a/b:1\n    targets: [home, ghcr]\n  - source: a/c:1\n",
        )
        .unwrap();
        assert_eq!(
            list.entries[0].targets.as_deref(),
            Some(&["home".to_string(), "ghcr".to_string()][..])
        );
        assert_eq!(list.entries[1].targets, None, "none named: every target");
        for (yaml, why) in [
            ("    targets: []\n", "targets must be a non-empty list"),
            ("    targets: [home, home]\n", "listed twice"),
        ] {
            let e = parse("m.yaml", &format!("images:\n  - source: a/b:1\n{yaml}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("m.yaml:3:") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn a_valid_list_in_every_form() {
        let list = parse("m.yaml", GOOD).unwrap();
        let e = &list.entries;
        assert_eq!(e.len(), 5);
        assert_eq!(e[0].line, 6);
        assert_eq!(e[0].source.repo_name(), "registry.k8s.io/pause");
        assert_eq!(e[0].tags, tags(&["3.9", "3.10"]));
        assert_eq!((e[0].policy, e[0].referrers), (Policy::Pin, false));
        assert!(!e[0].needs_listing());
        assert_eq!(e[1].source.repo_name(), "docker.io/library/nginx");
        assert_eq!((e[1].policy, e[1].latest), (Policy::Follow, Some(2)));
        assert!(e[1].needs_listing());
        assert!(e[2].referrers);
        assert_eq!(e[3].select(&[]), tags(&["v1.11.1"]));
        assert!(e[4].source.digest().is_some());
        assert_eq!(e[4].select(&tags(&["a"])), Vec::<String>::new());
        assert_eq!(e[4].line, 16);
    }

    #[test]
    fn selection_by_regex_semver_and_latest() {
        let list = parse("m.yaml", GOOD).unwrap();
        let available = tags(&[
            "1.27.0-alpine",
            "1.27.3-alpine",
            "1.27.10-alpine",
            "1.27.3",
            "x1.27.1-alpine",
            "latest",
        ]);
        // The regex must match the whole tag; the newest 2 by version.
        assert_eq!(
            list.entries[1].select(&available),
            tags(&["1.27.10-alpine", "1.27.3-alpine"])
        );
        let versions = tags(&[
            "v1.8.0",
            "1.8.2",
            "1.9.0-rc.1",
            "2.0.0",
            "1.7.9",
            "1.9",
            "latest",
            "v1.10.1",
        ]);
        assert_eq!(
            list.entries[2].select(&versions),
            tags(&["1.8.2", "v1.10.1", "v1.8.0"]),
            "in range, v-prefixed too; prereleases, partial versions and names left out"
        );
        // Explicit tags are kept even when not listed upstream.
        assert_eq!(list.entries[0].select(&[]), tags(&["3.10", "3.9"]));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = r#"defaults:
  policy: latest
images:
  - source: Registry.k8s.io/Pause
    tags: ["3.9"]
  - source: nginx
    tag_regex: '(unclosed'
    semver: "=>1"
    latest: 0
    color: blue
  - source: nginx:1.25
    tags: ["1.26"]
  - source: quay.io/a/b
  - tags: ["x"]
  - source: ghcr.io/x/y
    tags: ["bad tag"]
  - source: ghcr.io/x/y
    tags: ["ok"]
"#;
        let err = parse("mirrors.yaml", text).unwrap_err();
        let msg = err.to_string();
        let lines: Vec<usize> = err.problems.iter().map(|(l, _, _)| *l).collect();
        assert_eq!(lines, vec![2, 4, 7, 8, 9, 10, 11, 13, 14, 16], "{msg}");
        for want in [
            "mirrors.yaml:2:11: drift policy \"latest\" is not known",
            "mirrors.yaml:4:13: source \"Registry.k8s.io/Pause\" is not a valid image reference",
            "mirrors.yaml:7:16: tag_regex \"(unclosed\" is not a valid regular expression",
            "mirrors.yaml:8:13: semver \"=>1\" is not a version range",
            "mirrors.yaml:9:13: latest must be a whole number above 0",
            "mirrors.yaml:10:5: unknown key \"color\" in an image entry; the keys are: source, tags,",
            "mirrors.yaml:11: docker.io/library/nginx:1.25 names a tag and also tags",
            "mirrors.yaml:13: quay.io/a/b says no tags",
            "mirrors.yaml:14: this entry has no `source:`",
            "mirrors.yaml:16:12: tag \"bad tag\" is not valid",
        ] {
            assert!(msg.contains(want), "missing {want:?} in:\n{msg}");
        }
    }

    #[test]
    fn duplicates_yaml_errors_and_shapes() {
        let dup = "images:\n  - source: nginx\n    tags: [a]\n  - source: docker.io/library/nginx\n    tags: [b]\n";
        let msg = parse("m.yaml", dup).unwrap_err().to_string();
        assert!(
            msg.starts_with("m.yaml:4: docker.io/library/nginx is listed twice (first on line 2)"),
            "{msg}"
        );
        let bad_yaml = "images:\n  - source: nginx\n    tags: [a\n";
        let msg = parse("m.yaml", bad_yaml).unwrap_err().to_string();
        assert!(
            msg.starts_with("m.yaml:4:") && msg.contains("not valid YAML here"),
            "{msg}"
        );
        let msg = parse("m.yaml", "image:\n  - source: x\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("unknown key \"image\"") && msg.contains("no `images:` list"),
            "{msg}"
        );
        let msg = parse("m.yaml", "images: nginx\n").unwrap_err().to_string();
        assert!(msg.contains("m.yaml:1:1: images must be a list"), "{msg}");
        let msg = parse("m.yaml", "").unwrap_err().to_string();
        assert!(msg.contains("empty"), "{msg}");
        let twice = "images: []\nimages: []\n";
        let msg = parse("m.yaml", twice).unwrap_err().to_string();
        assert_eq!(
            msg,
            "m.yaml:2:1: key \"images\" is given twice in the same mapping (first on line 1); keep one"
        );
    }

    /// The one message of a list with one problem.
    fn problem(text: &str) -> String {
        let err = parse("m.yaml", text).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        err.to_string()
    }

    #[test]
    fn yaml_problems_name_their_place() {
        let cases = [
            (
                "images:\n  - source: a/b\n    tags: [x]\n    tags: [y]\n",
                "m.yaml:4:5: key \"tags\" is given twice in the same mapping (first on line 3)",
            ),
            (
                "images:\n  - &x source: a/b\n    tags: [x]\n",
                "m.yaml:2:8: YAML anchors and aliases",
            ),
            (
                "images:\n  - source: !!str a/b\n    tags: [x]\n",
                "m.yaml:2:19: YAML tags (`!name`) are not supported",
            ),
            (
                "images:\n\t- source: a/b\n",
                "m.yaml:2:2: not valid YAML here: tabs disallowed",
            ),
            (
                "- a/b\n",
                "m.yaml:1:1: the top must be a mapping with `images:`",
            ),
            (
                "# two\n---\nimages:\n  - source: a/b:1\n---\nimages:\n  - source: c/d:1\n",
                "m.yaml:5:1: a second YAML document starts here",
            ),
        ];
        for (text, want) in cases {
            let msg = problem(text);
            assert!(msg.starts_with(want), "{text:?}: {msg}");
        }
        // Empty defaults are no defaults.
        let list = parse(
            "m.yaml",
            "defaults:\n  # policy: pin\nimages:\n  - source: a/b:1\n",
        );
        assert_eq!(list.unwrap().entries[0].policy, Policy::Follow);
        // One leading `---` is one document.
        assert_eq!(
            parse("m.yaml", "---\nimages:\n  - source: a/b:1\n")
                .unwrap()
                .entries
                .len(),
            1
        );
    }

    #[test]
    fn wrong_types_are_named() {
        let cases = [
            (
                "images:\n  - source: a/b\n    tags: \"3.9\"\n",
                "m.yaml:3:11: tags must be a non-empty list",
            ),
            (
                "images:\n  - source: a/b\n    tags: []\n",
                "m.yaml:3:11: tags must be a non-empty list",
            ),
            (
                "images:\n  - source: a/b\n    tags: [{x: 1}]\n",
                "m.yaml:3:12: each tag must be a single value",
            ),
            (
                "images:\n  - source: [a/b]\n    tags: [x]\n",
                "m.yaml:2:13: source must be a single value",
            ),
            (
                "images:\n  - source: a/b\n    tags: [x]\n    referrers: yes\n",
                "m.yaml:4:16: referrers must be true or false, not \"yes\"",
            ),
            (
                "images:\n  - source: a/b\n    tags: [x]\n    policy: [pin]\n",
                "m.yaml:4:13: policy must be a single value",
            ),
            (
                "images:\n  - source: a/b\n    semver: '*'\n    latest: two\n",
                "m.yaml:4:13: latest must be a whole number above 0, not \"two\"",
            ),
            (
                "images:\n  - source: a/b\n    semver: '*'\n    latest: -1\n",
                "m.yaml:4:13: latest must be a whole number above 0",
            ),
            (
                "defaults: pin\nimages:\n  - source: a/b:1\n",
                "m.yaml:1:1: defaults must be a mapping",
            ),
            (
                "defaults:\n  policy: pin\n  latest: 3\nimages:\n  - source: a/b:1\n",
                "m.yaml:3:3: unknown key \"latest\" in defaults; the keys are: policy, referrers",
            ),
            (
                "images:\n  source: a/b\n",
                "m.yaml:1:1: images must be a list of entries",
            ),
            (
                "images:\n  - a/b:1\n",
                "m.yaml:2: an entry must be a mapping starting with `source:`",
            ),
        ];
        for (text, want) in cases {
            let msg = problem(text);
            assert!(msg.starts_with(want), "{text:?}: {msg}");
        }
    }

    #[test]
    fn conflicting_and_empty_selections_are_refused() {
        const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let cases = [
            (
                format!("images:\n  - source: a/b@{D}\n    tags: [x]\n"),
                format!("m.yaml:2: docker.io/a/b@{D} names a digest, which is one image; drop tags"),
            ),
            (
                format!("images:\n  - source: a/b@{D}\n    semver: '*'\n"),
                format!("m.yaml:2: docker.io/a/b@{D} names a digest"),
            ),
            (
                "images:\n  - source: a/b\n    latest: 2\n    tags: [x]\n".into(),
                "m.yaml:3:13: latest keeps the newest matches of tag_regex or semver".into(),
            ),
            (
                "images:\n  - source: a/b\n    tag_regex: ''\n".into(),
                "m.yaml:3:16: tag_regex is empty, which matches no tag".into(),
            ),
            (
                "images:\n  - source: a/b\n    tags: [\"1\", \"2\", \"1\"]\n".into(),
                "m.yaml:3:22: tag \"1\" is listed twice; keep one".into(),
            ),
            (
                "images:\n  - source: a/b:1\n  - source: docker.io/a/b\n    tags: [\"2\", \"1\"]\n"
                    .into(),
                "m.yaml:3: already named on another line: docker.io/a/b:1 (line 2); name each tag in one entry"
                    .into(),
            ),
        ];
        for (text, want) in cases {
            let msg = problem(&text);
            assert!(msg.starts_with(&want), "{text:?}: {msg}");
        }
        // The same repository by tag and by digest, or under two tags: different images.
        let fine = format!(
            "images:\n  - source: a/b:1\n  - source: a/b:2\n  - source: a/b@{D}\n  - source: a/b:1@{D}\n"
        );
        assert_eq!(parse("m.yaml", &fine).unwrap().entries.len(), 4);
    }

    #[test]
    fn unquoted_versions_keep_their_text() {
        // Through a YAML float, `3.10` would become 3.1 and `1.20` 1.2.
        let list = parse(
            "m.yaml",
            "images:\n  - source: a/b\n    tags: [3.10, 1.20, 010, 1e3]\n",
        )
        .unwrap();
        assert_eq!(list.entries[0].tags, tags(&["3.10", "1.20", "010", "1e3"]));
    }

    #[test]
    fn problems_are_capped_and_counted() {
        let mut text = String::from("images:\n");
        for i in 0..60 {
            text.push_str(&format!("  - source: a/b{i}\n    tags: [\"bad tag\"]\n"));
        }
        let err = parse("m.yaml", &text).unwrap_err();
        assert_eq!((err.problems.len(), err.more), (MAX_PROBLEMS, 10));
        let msg = err.to_string();
        let lines: Vec<&str> = msg.lines().collect();
        assert_eq!(lines.len(), MAX_PROBLEMS + 1);
        assert!(
            lines[0].starts_with("m.yaml:3:12: tag \"bad tag\" is not valid"),
            "{msg}"
        );
        assert_eq!(lines[MAX_PROBLEMS], "m.yaml: … and 10 more problem(s)");
    }

    /// An entry from YAML lines under `- source: a/b`.
    fn one(lines: &str) -> Entry {
        let text = format!("images:\n  - source: a/b\n{lines}");
        parse("m.yaml", &text)
            .unwrap_or_else(|e| panic!("{e}"))
            .entries
            .remove(0)
    }

    #[test]
    fn selection_is_the_union_sorted_without_duplicates() {
        let e = one("    tags: [\"b\", \"1.2.0\", \"zz\"]\n    semver: '>=1.0.0'\n");
        assert_eq!(
            e.select(&tags(&["1.2.0", "1.3.0", "b", "0.9.0", "a"])),
            tags(&["1.2.0", "1.3.0", "b", "zz"]),
            "explicit tags (zz is not upstream) plus matches, each once"
        );
    }

    #[test]
    fn regex_and_semver_together_must_both_match() {
        let e = one("    tag_regex: 'v.*'\n    semver: '>=1.0.0, <2'\n");
        assert_eq!(
            e.select(&tags(&["v1.0.0", "1.1.0", "v2.0.0", "vfoo", "v1.5.0"])),
            tags(&["v1.0.0", "v1.5.0"])
        );
        // The regex is anchored: `v.*` does not match `1.0.0v`, `1\.2` does not match `1.2.3`.
        let e = one("    tag_regex: '1\\.2'\n");
        assert_eq!(e.select(&tags(&["1.2", "1.2.3", "x1.2"])), tags(&["1.2"]));
        // Anchors written by the user change nothing.
        let e = one("    tag_regex: '^1\\.2$'\n");
        assert_eq!(e.select(&tags(&["1.2", "1.2.3", "x1.2"])), tags(&["1.2"]));
    }

    #[test]
    fn semver_takes_full_versions_and_prereleases_only_when_asked() {
        let available = tags(&[
            "1.9",
            "18",
            "1.9.0",
            "v1.9.1",
            "V1.9.2",
            "vv1.9.3",
            "1.9.4-rc.1",
            "1.10.0-rc.1",
            "01.9.5",
            "latest",
        ]);
        assert_eq!(
            one("    semver: '>=1.9.0'\n").select(&available),
            tags(&["1.9.0", "v1.9.1"]),
            "no partial versions, one lowercase v, no prereleases"
        );
        assert_eq!(
            one("    semver: '>=1.9.4-rc.1'\n").select(&available),
            tags(&["1.9.4-rc.1"]),
            "a range naming a prerelease admits that patch's prereleases"
        );
    }

    #[test]
    fn latest_keeps_the_newest_by_version_then_by_name() {
        let e = one("    semver: '*'\n    latest: 2\n");
        assert_eq!(
            e.select(&tags(&["1.9.0", "1.10.0", "v1.2.0", "1.10.0-rc.1"])),
            tags(&["1.10.0", "1.9.0"]),
            "1.10 is newer than 1.9 though it sorts before it by name"
        );
        let e = one("    tag_regex: '[a-z]+(-[0-9]+)?'\n    latest: 2\n");
        assert_eq!(
            e.select(&tags(&["alpha", "beta", "gamma", "beta-2"])),
            tags(&["beta-2", "gamma"]),
            "names that are not versions: the last by name"
        );
        let e = one("    tag_regex: '.*'\n    latest: 3\n");
        assert_eq!(
            e.select(&tags(&["zeta", "2.0.0", "1.0.0", "omega"])),
            tags(&["1.0.0", "2.0.0", "zeta"]),
            "versions before names"
        );
        // Fewer matches than asked for: all of them.
        let e = one("    semver: '>=2'\n    latest: 5\n");
        assert_eq!(e.select(&tags(&["2.0.0", "1.0.0"])), tags(&["2.0.0"]));
    }

    #[test]
    fn names_that_are_not_tags_are_never_selected() {
        let e = one("    tag_regex: '.*'\n    semver: '*'\n");
        assert_eq!(
            e.select(&tags(&["1.2.3+build", "1.2.3", "../1.2.4", ""])),
            tags(&["1.2.3"])
        );
    }

    #[test]
    fn the_example_file_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/mirrors.example.yaml");
        let list = load(Path::new(path)).unwrap_or_else(|e| panic!("{e}"));
        // It shows every form: explicit tags, regex with latest, semver pinned, one tag, one digest.
        let e = &list.entries;
        assert!(e.iter().any(|e| !e.tags.is_empty()));
        assert!(
            e.iter()
                .any(|e| e.tag_regex.is_some() && e.latest.is_some())
        );
        assert!(
            e.iter()
                .any(|e| e.semver.is_some() && e.policy == Policy::Pin)
        );
        assert!(e.iter().any(|e| e.source.tag().is_some()));
        assert!(e.iter().any(|e| e.source.digest().is_some()));
    }
}
