//! A shallow scanner for one JSON object: its top-level members as `(key, raw value)` pairs,
//! without building a tree.
//!
//! Precondition: the text is something serde_json's `RawValue` accepted, so its syntax,
//! its UTF-8, its control characters and its escapes' hex digits are already known to be
//! valid. What `RawValue` does not check, and a `serde_json::Value` parse does, is checked
//! here, so that [`object_members`] answers [`Shape::Invalid`] exactly when
//! `serde_json::from_str::<Value>` would fail on the same text:
//! - nesting deeper than serde_json's recursion limit (128 levels, counting the object);
//! - a number out of `f64` range (`1e400`);
//! - a `\u` escape that is a lone UTF-16 surrogate, in a key or a string value.
//!
//! The rare cases (an exponent, a very long number, a surrogate escape) are decided by
//! serde_json itself on just that literal, so the answer is the same by construction.
//!
//! Nothing here panics or loops on text that breaks the precondition: every index is
//! bounds-checked and every step moves forward; such text gets `Invalid` or meaningless
//! spans, never a crash.

use std::borrow::Cow;

/// serde_json's recursion limit: a `Value` parse fails on the 128th nested `[` or `{`.
const MAX_NESTING: usize = 127;

/// Numbers at most this long, without an exponent, are always in `f64` range.
const SHORT_NUMBER: usize = 300;

/// One member of a scanned object.
#[derive(Debug, Clone)]
pub(super) struct Member<'a> {
    /// The key, unescaped.
    pub key: Cow<'a, str>,
    /// The key's literal as sent, quotes included.
    pub key_raw: &'a str,
    /// The value's text as sent, without surrounding whitespace.
    pub value: &'a str,
}

/// What [`object_members`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// A JSON object that a `Value` parse accepts; its members were collected.
    Object,
    /// Valid JSON syntax, but not an object (nothing is said about `Value` validity).
    NotObject,
    /// An object that a `Value` parse refuses (or text that is not JSON at all).
    Invalid,
}

/// The text failed a check; the caller only needs to know that.
struct Invalid;

/// Collects the top-level members of the object `text` into `out` (cleared first), in the
/// order sent, duplicates included. `nesting` is the object's own depth: 1 for an event
/// body, 2 for an object inside one.
pub(super) fn object_members<'a>(
    text: &'a str,
    nesting: usize,
    out: &mut Vec<Member<'a>>,
) -> Shape {
    out.clear();
    let mut scanner = Scanner {
        text,
        bytes: text.as_bytes(),
        pos: 0,
    };
    scanner.skip_whitespace();
    if scanner.peek() != Some(b'{') {
        return Shape::NotObject;
    }
    match scanner.members(nesting, &mut |member| out.push(member)) {
        Ok(()) => Shape::Object,
        Err(Invalid) => {
            out.clear();
            Shape::Invalid
        }
    }
}

/// The raw value of the last top-level member named `key` of the object `text` (the one a
/// `Value` parse keeps), found without collecting the members: the cost is one pass over
/// the text and no allocation, whatever the body holds. `None` unless the shape is
/// [`Shape::Object`].
pub(super) fn last_member<'a>(text: &'a str, key: &str) -> (Shape, Option<&'a str>) {
    let mut scanner = Scanner {
        text,
        bytes: text.as_bytes(),
        pos: 0,
    };
    scanner.skip_whitespace();
    if scanner.peek() != Some(b'{') {
        return (Shape::NotObject, None);
    }
    let mut found = None;
    match scanner.members(1, &mut |member| {
        if member.key == key {
            found = Some(member.value);
        }
    }) {
        Ok(()) => (Shape::Object, found),
        Err(Invalid) => (Shape::Invalid, None),
    }
}

/// The string a JSON value's text holds, unescaped; `None` when it is not a string.
pub(super) fn string_value(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.as_bytes().contains(&b'\\') {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
}

/// Whether a JSON value's text is a string.
pub(super) fn is_string(raw: &str) -> bool {
    raw.starts_with('"')
}

/// Whether a JSON value's text is a non-empty string (`""` is the only empty one: every
/// escape stands for at least one character).
pub(super) fn is_non_empty_string(raw: &str) -> bool {
    raw.len() > 2 && raw.starts_with('"')
}

/// Whether a JSON value's text is a number.
pub(super) fn is_number(raw: &str) -> bool {
    matches!(raw.as_bytes().first(), Some(b'-' | b'0'..=b'9'))
}

/// Whether a JSON value's text is an object.
pub(super) fn is_object(raw: &str) -> bool {
    raw.starts_with('{')
}

/// Whether a JSON value's text is `null`.
pub(super) fn is_null(raw: &str) -> bool {
    raw == "null"
}

struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    fn slice(&self, start: usize) -> Result<&'a str, Invalid> {
        self.text.get(start..self.pos).ok_or(Invalid)
    }

    /// The members of the object whose `{` is at `pos`.
    fn members(
        &mut self,
        nesting: usize,
        visit: &mut impl FnMut(Member<'a>),
    ) -> Result<(), Invalid> {
        if nesting > MAX_NESTING {
            return Err(Invalid);
        }
        self.pos += 1;
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            return Ok(());
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(Invalid);
            }
            let start = self.pos;
            let escaped = self.skip_string()?;
            let key_raw = self.slice(start)?;
            let key = if escaped {
                Cow::Owned(serde_json::from_str::<String>(key_raw).map_err(|_| Invalid)?)
            } else {
                Cow::Borrowed(
                    key_raw
                        .strip_prefix('"')
                        .and_then(|key| key.strip_suffix('"'))
                        .ok_or(Invalid)?,
                )
            };
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return Err(Invalid);
            }
            self.pos += 1;
            self.skip_whitespace();
            let start = self.pos;
            self.skip_value(nesting)?;
            let value = self.slice(start)?;
            visit(Member {
                key,
                key_raw,
                value,
            });
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => return Ok(()),
                _ => return Err(Invalid),
            }
        }
    }

    /// Skips the value at `pos`, a member of a container at depth `nesting`.
    fn skip_value(&mut self, nesting: usize) -> Result<(), Invalid> {
        let mut open = 0usize;
        loop {
            match self.peek().ok_or(Invalid)? {
                b'"' => {
                    self.skip_string()?;
                }
                b'{' | b'[' => {
                    open += 1;
                    if nesting + open > MAX_NESTING {
                        return Err(Invalid);
                    }
                    self.pos += 1;
                    continue;
                }
                b'}' | b']' => {
                    open = open.checked_sub(1).ok_or(Invalid)?;
                    self.pos += 1;
                }
                b'-' | b'0'..=b'9' => self.skip_number()?,
                b't' | b'n' => self.pos += 4,
                b'f' => self.pos += 5,
                b',' | b':' | b' ' | b'\n' | b'\r' | b'\t' if open > 0 => {
                    self.pos += 1;
                    continue;
                }
                _ => return Err(Invalid),
            }
            if open == 0 {
                return if self.pos <= self.bytes.len() {
                    Ok(())
                } else {
                    Err(Invalid)
                };
            }
        }
    }

    /// Skips the string whose opening quote is at `pos`; answers whether it holds escapes.
    fn skip_string(&mut self) -> Result<bool, Invalid> {
        let start = self.pos;
        self.pos += 1;
        let mut escaped = false;
        let mut surrogate = false;
        loop {
            self.pos = quote_or_backslash(self.bytes, self.pos);
            match self.peek().ok_or(Invalid)? {
                b'"' => {
                    self.pos += 1;
                    break;
                }
                _ => {
                    escaped = true;
                    match self.bytes.get(self.pos + 1).ok_or(Invalid)? {
                        b'u' => {
                            let hex = self.bytes.get(self.pos + 2..self.pos + 4).ok_or(Invalid)?;
                            if matches!(hex, [b'd' | b'D', b'8' | b'9' | b'a'..=b'f' | b'A'..=b'F'])
                            {
                                surrogate = true;
                            }
                            self.pos += 6;
                        }
                        _ => self.pos += 2,
                    }
                }
            }
        }
        if surrogate {
            // Paired surrogates are fine, lone ones fail a `Value` parse: let serde_json say.
            let literal = self.slice(start)?;
            serde_json::from_str::<String>(literal).map_err(|_| Invalid)?;
        }
        Ok(escaped)
    }

    /// Skips the number at `pos`.
    fn skip_number(&mut self) -> Result<(), Invalid> {
        let start = self.pos;
        let mut exponent = false;
        while let Some(byte) = self.peek() {
            match byte {
                b'0'..=b'9' | b'-' | b'+' | b'.' => {}
                b'e' | b'E' => exponent = true,
                _ => break,
            }
            self.pos += 1;
        }
        if exponent || self.pos - start > SHORT_NUMBER {
            // Only these can be out of `f64` range: let serde_json say.
            let literal = self.slice(start)?;
            serde_json::from_str::<serde_json::Value>(literal).map_err(|_| Invalid)?;
        }
        Ok(())
    }
}

/// The index of the first `"` or `\` in `bytes` at or after `from`, or `bytes.len()`.
/// Eight bytes at a time: strings are most of an event's bytes.
#[inline]
fn quote_or_backslash(bytes: &[u8], from: usize) -> usize {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut pos = from;
    while let Some(chunk) = bytes.get(pos..pos + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let quote = word ^ (LOW * u64::from(b'"'));
        let backslash = word ^ (LOW * u64::from(b'\\'));
        let found =
            (quote.wrapping_sub(LOW) & !quote | backslash.wrapping_sub(LOW) & !backslash) & HIGH;
        if found != 0 {
            return pos + (found.trailing_zeros() / 8) as usize;
        }
        pos += 8;
    }
    while let Some(&byte) = bytes.get(pos) {
        if byte == b'"' || byte == b'\\' {
            return pos;
        }
        pos += 1;
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(text: &str) -> (Shape, Vec<(String, String)>) {
        let mut out = Vec::new();
        let shape = object_members(text, 1, &mut out);
        let pairs = out
            .iter()
            .map(|m| (m.key.to_string(), m.value.to_string()))
            .collect();
        (shape, pairs)
    }

    #[test]
    fn members_keep_their_raw_text_and_order_with_duplicates() {
        let (shape, pairs) =
            members(r#" { "a" : [1, {"b":"}"}] ,"k\u0065y":"x\"y", "a": -1.5e3 , "n":null} "#);
        assert_eq!(shape, Shape::Object);
        assert_eq!(
            pairs,
            [
                ("a".into(), r#"[1, {"b":"}"}]"#.into()),
                ("key".into(), r#""x\"y""#.into()),
                ("a".into(), "-1.5e3".into()),
                ("n".into(), "null".into()),
            ]
        );
    }

    #[test]
    fn shapes_follow_a_value_parse() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        for (text, shape) in [
            ("{}".to_string(), Shape::Object),
            ("[]".to_string(), Shape::NotObject),
            ("\"{\"".to_string(), Shape::NotObject),
            (r#"{"a":1e400}"#.to_string(), Shape::Invalid),
            (r#"{"a":[1E308, 2e-400]}"#.to_string(), Shape::Object),
            (r#"{"a":"\ud800"}"#.to_string(), Shape::Invalid),
            (r#"{"\udc00":1}"#.to_string(), Shape::Invalid),
            (r#"{"a":"\ud83d\ude00"}"#.to_string(), Shape::Object),
            (format!(r#"{{"a":{}}}"#, deep(126)), Shape::Object),
            (format!(r#"{{"a":{}}}"#, deep(127)), Shape::Invalid),
        ] {
            let expected_valid = serde_json::from_str::<serde_json::Value>(&text).is_ok();
            assert_eq!(members(&text).0, shape, "{text}");
            assert_eq!(shape != Shape::Invalid, expected_valid, "{text}");
        }
    }

    #[test]
    fn quote_or_backslash_finds_the_first_at_any_offset() {
        for len in 0..40 {
            for at in 0..=len {
                let mut bytes = vec![b'x'; len];
                if at < len {
                    bytes[at] = if at % 2 == 0 { b'"' } else { b'\\' };
                }
                for from in 0..=at.min(len) {
                    assert_eq!(quote_or_backslash(&bytes, from), at, "{len} {at} {from}");
                }
            }
        }
    }

    #[test]
    fn text_that_is_not_json_is_invalid_without_panicking() {
        for text in [
            "{",
            "{\"a",
            "{\"a\":",
            "{\"a\":t",
            "{\"a\":\"\\u12",
            "{\"a\":]}",
            "{\"a\" 1}",
        ] {
            assert_ne!(members(text).0, Shape::Object, "{text}");
        }
    }

    #[test]
    fn last_member_finds_the_value_a_value_parse_keeps() {
        let text = r#"{"writeKey":"a","batch":[{"writeKey":"inner"}],"write\u004bey":"b"}"#;
        assert_eq!(
            last_member(text, "writeKey"),
            (Shape::Object, Some(r#""b""#))
        );
        assert_eq!(last_member(text, "absent"), (Shape::Object, None));
        assert_eq!(last_member("[1]", "writeKey"), (Shape::NotObject, None));
        assert_eq!(last_member(r#"{"a":1e400}"#, "a"), (Shape::Invalid, None));
    }

    #[test]
    fn string_values_are_unescaped_only_when_needed() {
        assert_eq!(string_value(r#""abc""#).as_deref(), Some("abc"));
        assert!(matches!(string_value(r#""abc""#), Some(Cow::Borrowed(_))));
        assert_eq!(string_value(r#""a\nb\u0063""#).as_deref(), Some("a\nbc"));
        assert_eq!(string_value("12"), None);
        assert_eq!(string_value("null"), None);
        assert!(is_non_empty_string(r#""\u0000""#));
        assert!(!is_non_empty_string(r#""""#));
    }
}
