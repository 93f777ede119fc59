//! A strict parser of the Prometheus text exposition format (0.0.4), to check `/metrics`.

use std::collections::HashMap;

/// One sample: name, labels (unescaped), value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// A strict parser of the Prometheus text format 0.0.4: `# HELP` and `# TYPE` once per family
/// and before its samples, sample names of the declared family (`_bucket`, `_sum`, `_count` for
/// histograms), label names `[a-zA-Z_][a-zA-Z0-9_]*`, label values quoted with only `\\`,
/// `\"` and `\n` escapes, values that parse as floats, nothing else.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let name_ok = |n: &str| {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = |m: &str| format!("line {}: {m}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest
                .split_once(' ')
                .ok_or_else(|| at("HELP without text"))?;
            if !name_ok(name) || helps.insert(name.into(), help.into()).is_some() {
                return Err(at("bad or repeated HELP"));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest
                .split_once(' ')
                .ok_or_else(|| at("TYPE without type"))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t)
                || !helps.contains_key(name)
                || types.insert(name.into(), t.into()).is_some()
            {
                return Err(at("bad, repeated or HELP-less TYPE"));
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(at("unexpected comment or blank line"));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value"))?;
        let name = &line[..name_end];
        let family = [
            name,
            name.strip_suffix("_bucket").unwrap_or(""),
            name.strip_suffix("_sum").unwrap_or(""),
            name.strip_suffix("_count").unwrap_or(""),
        ]
        .into_iter()
        .find(|f| !f.is_empty() && types.contains_key(*f))
        .ok_or_else(|| at("sample of an undeclared family"))?;
        if family != name && types[family] != "histogram" {
            return Err(at("suffix on a non-histogram"));
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            loop {
                if let Some(r) = rest.strip_prefix('}') {
                    rest = r;
                    break;
                }
                let (k, r) = rest.split_once("=\"").ok_or_else(|| at("bad label"))?;
                if !name_ok(k) || k.contains(':') {
                    return Err(at("bad label name"));
                }
                let mut value = String::new();
                let mut chars = r.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            _ => return Err(at("bad escape")),
                        },
                        Some((j, '"')) => break j,
                        Some((_, c)) => value.push(c),
                        None => return Err(at("unterminated label value")),
                    }
                };
                labels.push((k.to_string(), value));
                rest = &r[end + 1..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
        }
        let v = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value"))?;
        let v: f64 = match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| at("value is not a float"))?,
        };
        samples.push((name.to_string(), labels, v));
    }
    Ok(samples)
}

pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && l.iter()
                    .zip(labels)
                    .all(|((a, b), (c, d))| a == c && b == d)
        })
        .map(|s| s.2)
}
