//! Loading the settings in layers, with [figment]: the defaults, then the TOML file
//! (`--config`), then every key from the environment as `GATEWAY_<TABLE>__<KEY>`
//! (`GATEWAY_DELIVERY__MAX_CONCURRENCY=64` sets `delivery.max_concurrency`), then the
//! documented short names ([`ENV_VARS`](super::ENV_VARS): `GATEWAY_LISTEN`,
//! `GATEWAY_WRITE_KEYS`, …), which stay as aliases and win.
//!
//! Invariants:
//! - The file is parsed strictly first, so its errors name the key and the line; only the
//!   environment's values are converted leniently (every environment value is text:
//!   `"64"` becomes a number, `"true"` a boolean, `[a, b]` a list where the key wants
//!   one).
//! - An unknown key is refused wherever it comes from: a misspelt
//!   `GATEWAY_DELIVERY__MAX_CONCURENCY` fails start-up naming the variable, never is
//!   ignored.
//! - Empty environment values count as unset.
//! - The result has passed [`Settings::validate`]; the only IO is reading the file.

use std::collections::BTreeMap;
use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use figment::Figment;

use super::{error, ConfigError, Settings, ENV_VARS};

/// The prefix of every environment variable the gateway reads as a key path.
const PREFIX: &str = "GATEWAY_";
/// Separates tables in a key path variable: `GATEWAY_NATS__URL` is `nats.url`.
const SEPARATOR: &str = "__";

impl Settings {
    /// Loads defaults, then `file` (if given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Settings::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`] with only the short names, looked up by `env` (tests).
    pub fn load_with(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let vars = ENV_VARS
            .iter()
            .filter_map(|(name, _)| env(name).map(|value| (name.to_string(), value)));
        Settings::load_from(file, vars)
    }

    /// Like [`Settings::load`] with the environment given as its variables.
    pub fn load_from(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .filter(|(_, value)| !value.trim().is_empty())
            .collect();
        let mut figment = Figment::new();
        if let Some(path) = file {
            figment = figment.merge(Toml::string(&read_strictly(path)?));
        }
        let layered = key_paths(&vars);
        for (key, (_, value)) in &layered {
            figment = figment.merge(Serialized::default(key, value));
        }
        let mut settings: Settings = figment
            .extract_lossy()
            .map_err(|e| describe(&e, &layered))?;
        settings.apply_env(|name| vars.get(name).cloned())?;
        settings.validate()?;
        Ok(settings)
    }
}

/// The file's text, once toml has accepted it as settings on its own: toml's errors carry
/// the place, which figment's lose.
fn read_strictly(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| error("--config", format!("cannot read {}: {e}", path.display())))?;
    toml::from_str::<Settings>(&text).map_err(|e| {
        let place = match e.span() {
            Some(span) => format!("{}, {}", path.display(), locate(&text, span.start)),
            None => path.display().to_string(),
        };
        error(&place, e.message().to_string())
    })?;
    Ok(text)
}

/// The key path variables (`GATEWAY_A__B`), by key path (`a.b`), each with its variable
/// and its value. A value that starts with `[` is a list (`[a, b]`); any other stays text
/// for the lenient extraction to convert.
fn key_paths(vars: &BTreeMap<String, String>) -> BTreeMap<String, (String, Value)> {
    vars.iter()
        .filter_map(|(name, value)| {
            let path = name.strip_prefix(PREFIX)?;
            if !path.contains(SEPARATOR) {
                return None;
            }
            let key = path.to_ascii_lowercase().replace(SEPARATOR, ".");
            let value = match value.trim_start().starts_with('[') {
                true => value.parse().unwrap_or_else(|_| Value::from(value.clone())),
                false => Value::from(value.clone()),
            };
            Some((key, (name.clone(), value)))
        })
        .collect()
}

/// figment's error as the gateway's: the key, the variable that set it when one did, and
/// what was wrong.
fn describe(e: &figment::Error, layered: &BTreeMap<String, (String, Value)>) -> ConfigError {
    let key = e.path.join(".");
    let variable = layered
        .iter()
        .find(|(path, _)| key == **path || key.starts_with(&format!("{path}.")))
        .map(|(_, (name, _))| name.clone())
        .or_else(|| {
            // An unknown key's path ends at the known table; name the variable under it.
            let field = unknown_field(&e.kind)?;
            let full = if key.is_empty() {
                field
            } else {
                format!("{key}.{field}")
            };
            layered.get(&full).map(|(name, _)| name.clone())
        });
    match variable {
        Some(name) => error(&format!("{key} ({name})"), e.kind.to_string()),
        None => error(&key, e.kind.to_string()),
    }
}

/// The field an `unknown field` error names.
fn unknown_field(kind: &figment::error::Kind) -> Option<String> {
    match kind {
        figment::error::Kind::UnknownField(field, _) => Some(field.clone()),
        _ => None,
    }
}

/// Where in a TOML document byte `at` is: `key `delivery.max_concurrency` (line 4)`.
/// toml's message alone names the type, not the key; the key is the one assigned on the
/// error's line (or the nearest line above that assigns one, for a value spread over
/// lines), under the nearest table header above it.
fn locate(text: &str, at: usize) -> String {
    let at = at.min(text.len());
    let line_no = text[..at].matches('\n').count() + 1;
    let lines: Vec<&str> = text.lines().take(line_no).collect();
    // A table whose header is on the error's line (`[sources.x]` where a list is wanted).
    if let Some(header) = lines
        .last()
        .map(|l| l.trim())
        .filter(|l| l.starts_with('['))
    {
        let name = header.trim_matches(|c| c == '[' || c == ']').trim();
        return format!("table `{name}` (line {line_no})");
    }
    let assignment = lines.iter().rposition(|line| {
        let line = line.trim_start();
        !line.starts_with('[') && !line.starts_with('#') && line.contains('=')
    });
    let Some(index) = assignment else {
        return format!("line {line_no}");
    };
    let key = lines[index].split('=').next().unwrap_or("").trim();
    let key: String = key
        .split('.')
        .map(|part| part.trim().trim_matches('"'))
        .collect::<Vec<_>>()
        .join(".");
    let header = lines[..index]
        .iter()
        .rev()
        .map(|line| line.trim())
        .find(|line| line.starts_with('['))
        .map(|line| {
            line.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string()
        });
    let dotted = match header {
        Some(header) if !header.is_empty() => format!("{header}.{key}"),
        _ => key,
    };
    format!("key `{dotted}` (line {line_no})")
}

#[cfg(test)]
mod tests {
    use super::locate;

    #[test]
    fn an_error_is_located_at_its_key_or_its_table() {
        let text = "listen = \"x\"\n[delivery]\nenabled = false\n\n[sources.default]\nslug = 1\n";
        let at = |needle: &str| text.find(needle).expect("in the text");
        assert_eq!(locate(text, at("false")), "key `delivery.enabled` (line 3)");
        assert_eq!(
            locate(text, at("[sources")),
            "table `sources.default` (line 5)"
        );
        assert_eq!(
            locate(text, at("1\n")),
            "key `sources.default.slug` (line 6)"
        );
        assert_eq!(locate(text, 0), "key `listen` (line 1)");
    }
}
