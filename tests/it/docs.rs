//! The front door in two languages: README.md and README.zh-CN.md link to each other, tell the
//! same scenario and list the same configuration variables, and every variable the binary reads
//! is in both.

use std::collections::BTreeSet;

fn read(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn mirror_names(text: &str) -> BTreeSet<String> {
    regex::Regex::new(r"MIRROR_[A-Z][A-Z_]*[A-Z]")
        .unwrap()
        .find_iter(text)
        .map(|m| m.as_str().to_string())
        .collect()
}

#[test]
fn the_chinese_readme_lists_the_same_configuration_and_links_both_ways() {
    let en = read("README.md");
    let zh = read("README.zh-CN.md");
    let (en_names, zh_names) = (mirror_names(&en), mirror_names(&zh));
    assert_eq!(
        en_names.difference(&zh_names).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "in README.md but not in README.zh-CN.md"
    );
    assert_eq!(
        zh_names.difference(&en_names).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "in README.zh-CN.md but not in README.md"
    );
    // Every `env = "MIRROR_…"` the command line reads is documented in both.
    let config = read("src/config.rs");
    let read_by_binary: BTreeSet<String> = regex::Regex::new(r#"env = "(MIRROR_[A-Z_]+)""#)
        .unwrap()
        .captures_iter(&config)
        .map(|c| c[1].to_string())
        .collect();
    assert!(read_by_binary.len() > 20, "{read_by_binary:?}");
    let undocumented: Vec<&String> = read_by_binary.difference(&en_names).collect();
    assert!(
        undocumented.is_empty(),
        "read by the binary, in neither README: {undocumented:?}"
    );

    assert!(
        en.contains("](README.zh-CN.md)"),
        "README.md links to the Chinese one"
    );
    assert!(zh.contains("](README.md)"), "README.zh-CN.md links back");
    // The scenario: kaniko to ghcr.io, pulled by the official digest; the two commands.
    for want in [
        "gcr.io/kaniko-project/executor:v1.8.1",
        "ghcr.io/acme/mirror",
        "@sha256:",
        "scripts/run.sh",
        "scripts/test.sh",
        "mirror-mirror copy",
        "mirror-mirror verify",
    ] {
        assert!(zh.contains(want), "README.zh-CN.md lacks {want}");
    }
    // Written in Chinese, not a copy of the English text.
    let han = zh
        .chars()
        .filter(|c| ('\u{4e00}'..='\u{9fff}').contains(c))
        .count();
    assert!(han > 2000, "{han} Han characters");
    // The same sections, in the same order: commands, copy, verify, serve, API, deploying.
    let order = |text: &str, heads: &[&str]| -> Vec<usize> {
        heads
            .iter()
            .map(|h| text.find(h).unwrap_or_else(|| panic!("no {h:?}")))
            .collect()
    };
    let en_order = order(
        &en,
        &[
            "## The two commands",
            "## `mirror-mirror copy`",
            "## `mirror-mirror verify`",
            "## `mirror-mirror serve`",
            "## API",
            "## Deploying",
        ],
    );
    let zh_order = order(
        &zh,
        &[
            "## 两条命令",
            "## `mirror-mirror copy`",
            "## `mirror-mirror verify`",
            "## `mirror-mirror serve`",
            "## API",
            "## 部署",
        ],
    );
    assert!(en_order.is_sorted() && zh_order.is_sorted());
}
