use super::*;

fn map(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

#[test]
fn dates_parse_in_the_usual_notations() {
    for text in [
        "2020-08-20T14:48:00.000Z",
        "2020-08-20T16:48:00+02:00",
        "2020-08-20 14:48:00",
        "2020-08-20T14:48:00",
    ] {
        assert_eq!(
            parse_date(text).map(|d| iso(&d)).as_deref(),
            Some("2020-08-20T14:48:00.000000Z"),
            "{text}"
        );
    }
    assert_eq!(
        parse_date("2022-07-09").map(|d| iso(&d)).as_deref(),
        Some("2022-07-09T00:00:00.000000Z")
    );
    assert_eq!(parse_date("yesterday"), None);
}

#[test]
fn an_id_adopts_the_anonymous_contact_with_its_email() {
    let mut store = Store::new(10);
    let now = Utc::now();
    let by_email =
        IdentifyInput::from_params(&map(json!({"email": "a@x.io"})), LongStrings::Reject)
            .expect("valid");
    let first = store.identify(by_email, now);
    let with_id = IdentifyInput::from_params(
        &map(json!({"id": "u1", "email": "a@x.io"})),
        LongStrings::Reject,
    )
    .expect("valid");
    assert_eq!(store.identify(with_id, now), first);
    assert_eq!(store.snapshot().contacts.len(), 1);
    assert_eq!(store.find_user("u1"), store.find_user("a@x.io"));
}

#[test]
fn long_strings_are_refused_or_truncated() {
    let long = "x".repeat(256);
    let params = map(json!({"id": "u", "bio": long}));
    assert!(IdentifyInput::from_params(&params, LongStrings::Reject).is_err());
    let mut store = Store::new(10);
    let input = IdentifyInput::from_params(&params, LongStrings::Truncate).expect("valid");
    store.identify(input, Utc::now());
    let view = store
        .find_user("u")
        .and_then(|s| store.contact_view(s))
        .expect("contact");
    assert_eq!(view.attributes["bio"].as_str().map(str::len), Some(255));
}
