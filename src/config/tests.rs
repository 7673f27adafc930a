use super::*;
use std::collections::HashMap;

fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    if let Some(text) = file {
        std::fs::write(&path, text).expect("write config");
    }
    Settings::load_from(file.map(|_| path.as_path()), env)
}

#[test]
fn a_type_error_names_the_key_and_the_line() {
    let text = "listen = \"127.0.0.1:8080\"\n\n[delivery]\nmax_concurrency = \"lots\"\n";
    let e = load(Some(text), &[]).expect_err("a string for a number");
    assert!(e.to_string().contains("delivery.max_concurrency"), "{e}");
    assert!(e.to_string().contains("line 4"), "{e}");
    let text = "[[sources]]\nslug = \"a\"\nwrite_keys = \"not-a-list\"\n";
    let e = load(Some(text), &[]).expect_err("a string for a list");
    assert!(e.to_string().contains("sources.write_keys"), "{e}");
}

#[test]
fn environment_defines_the_default_source() {
    let settings = load(
        None,
        &[
            ("GATEWAY_WRITE_KEYS", "k1, k2"),
            ("GATEWAY_WEBHOOK_SECRET", "shared-webhook-secret"),
            ("REFINER_API_KEY", "r"),
            ("GATEWAY_LISTEN", "127.0.0.1:9999"),
            ("GATEWAY_DATA_DIR", "/tmp/x"),
            ("REFINER_BASE_URL", "http://127.0.0.1:1/v1"),
        ],
    )
    .expect("valid");
    assert_eq!(settings.listen, "127.0.0.1:9999");
    assert_eq!(settings.data_dir, PathBuf::from("/tmp/x"));
    assert_eq!(settings.refiner.base_url, "http://127.0.0.1:1/v1");
    assert_eq!(settings.sources.len(), 1);
    let source = &settings.sources[0];
    assert_eq!(source.slug, "default");
    assert_eq!(
        source.write_keys,
        vec![Secret::new("k1"), Secret::new("k2")]
    );
    assert_eq!(
        source.webhook_secret,
        Some(Secret::new("shared-webhook-secret"))
    );
    assert_eq!(source.refiner_api_key, Some(Secret::new("r")));
}

#[test]
fn defaults_apply() {
    let settings = load(None, &[("GATEWAY_WRITE_KEYS", "k")]).expect("valid");
    assert_eq!(settings.listen, "127.0.0.1:8080");
    assert_eq!(settings.data_dir, PathBuf::from("./data"));
    assert_eq!(settings.refiner.base_url, "https://api.refiner.io/v1");
    assert_eq!(settings.spool.dedup_window_secs, 86_400);
}

#[test]
fn file_defines_several_sources_and_env_overrides() {
    let file = r#"
            listen = "127.0.0.1:7000"
            [[sources]]
            slug = "web"
            write_keys = ["w1"]
            webhook_secret = "hook-secret-of-the-web"
            refiner_api_key = "rk"
            [[sources]]
            slug = "default"
            write_keys = ["d1"]
        "#;
    let settings = load(
        Some(file),
        &[
            ("GATEWAY_LISTEN", "127.0.0.1:7001"),
            ("GATEWAY_WRITE_KEYS", "d2"),
        ],
    )
    .expect("valid");
    assert_eq!(settings.listen, "127.0.0.1:7001");
    assert_eq!(settings.sources.len(), 2);
    assert_eq!(
        settings.sources[0].webhook_secret,
        Some(Secret::new("hook-secret-of-the-web"))
    );
    assert_eq!(settings.sources[1].write_keys, vec![Secret::new("d2")]);
}

#[test]
fn errors_name_the_key() {
    let err = load(None, &[]).expect_err("no source");
    assert!(err.to_string().contains("GATEWAY_WRITE_KEYS"), "{err}");
    let err = load(
        None,
        &[("GATEWAY_WRITE_KEYS", "k"), ("GATEWAY_LISTEN", "nope")],
    )
    .expect_err("bad listen");
    assert!(err.to_string().contains("GATEWAY_LISTEN"), "{err}");
    let err = load(
        None,
        &[("GATEWAY_WRITE_KEYS", "k"), ("REFINER_BASE_URL", "::")],
    )
    .expect_err("bad url");
    assert!(err.to_string().contains("REFINER_BASE_URL"), "{err}");
    let err = load(
        None,
        &[
            ("GATEWAY_WRITE_KEYS", "k"),
            ("GATEWAY_DEDUP_WINDOW_SECS", "x"),
        ],
    )
    .expect_err("bad number");
    assert!(
        err.to_string().contains("GATEWAY_DEDUP_WINDOW_SECS"),
        "{err}"
    );
    let err = load(Some("lisen = 1"), &[("GATEWAY_WRITE_KEYS", "k")]).expect_err("unknown key");
    assert!(err.to_string().contains("lisen"), "{err}");
    let err = load(
        Some("[[sources]]\nslug = \"Bad Slug\"\nwrite_keys = [\"a\"]"),
        &[],
    )
    .expect_err("slug");
    assert!(err.to_string().contains("sources.slug"), "{err}");
    let err = load(
        Some("[limits]\nmax_event_bytes = 0"),
        &[("GATEWAY_WRITE_KEYS", "k")],
    )
    .expect_err("zero");
    assert!(err.to_string().contains("limits.max_event_bytes"), "{err}");
}

#[test]
fn every_key_can_come_from_the_environment() {
    let file = "[delivery]\nmax_concurrency = 8\n[nats]\nurl = \"nats://file:4222\"\n";
    let settings = load(
        Some(file),
        &[
            ("GATEWAY_WRITE_KEYS", "k"),
            ("GATEWAY_DELIVERY__MAX_CONCURRENCY", "48"),
            ("GATEWAY_DELIVERY__ENABLED", "false"),
            ("GATEWAY_ADMIN_TOKEN", "0123456789012345678"),
            ("GATEWAY_NATS__URL", "nats://env:4222"),
            ("GATEWAY_NATS_URL", "nats://alias:4222"),
            ("GATEWAY_SKIP_NATS", "1"),
        ],
    )
    .expect("valid");
    assert_eq!(
        settings.delivery.max_concurrency, 48,
        "the environment over the file"
    );
    assert!(!settings.delivery.enabled);
    assert_eq!(
        settings.admin_token,
        Some(Secret::new("0123456789012345678")),
        "digits stay text where the key wants text"
    );
    assert_eq!(
        settings.nats.url, "nats://alias:4222",
        "the short name wins"
    );
}

#[test]
fn an_environment_key_error_names_the_variable() {
    let err = load(
        None,
        &[
            ("GATEWAY_WRITE_KEYS", "k"),
            ("GATEWAY_DELIVERY__MAX_CONCURRENCY", "lots"),
        ],
    )
    .expect_err("a word for a number");
    let text = err.to_string();
    assert!(text.contains("delivery.max_concurrency"), "{text}");
    assert!(text.contains("GATEWAY_DELIVERY__MAX_CONCURRENCY"), "{text}");
    let err = load(
        None,
        &[
            ("GATEWAY_WRITE_KEYS", "k"),
            ("GATEWAY_DELIVERY__MAX_CONCURENCY", "8"),
        ],
    )
    .expect_err("a misspelt key");
    let text = err.to_string();
    assert!(text.contains("GATEWAY_DELIVERY__MAX_CONCURENCY"), "{text}");
    assert!(text.contains("max_concurency"), "{text}");
}

#[test]
fn secrets_do_not_show_in_debug() {
    let settings = load(None, &[("GATEWAY_WRITE_KEYS", "very-secret-key")]).expect("valid");
    assert!(!format!("{settings:?}").contains("very-secret-key"));
    assert_eq!(Secret::new("abcdefgh").masked(), "ab…gh");
}
