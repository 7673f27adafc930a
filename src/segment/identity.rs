//! The identities that cross modules: the [`UserKey`] a user's events are ordered by, and
//! the [`HoldKey`] (`(source, user)`) that the spools and the dispatcher keep per-user
//! state under.
//!
//! Invariants:
//! - The text forms are built and read here and nowhere else: a user key is `u:<userId>`,
//!   `e:<email>` or `a:<anonymousId>`, a hold key is `<source>\u{1f}<user key>` (the SQLite
//!   spool's SQL spells the same as `source || char(31) || user_key`).
//! - The text forms are what the spools store (columns, lane rows, JetStream headers); they
//!   never change, so spool files written by earlier versions keep working.
//! - A key read back from storage is taken as stored ([`UserKey::from_stored`]): a text
//!   without one of the three prefixes (never written by the gateway) has no [`Identity`]
//!   and counts as not identified, as it always did.

use std::fmt;

/// The separator between the source and the user key in a hold key's text form.
const HOLD_SEPARATOR: char = '\u{1f}';

/// Who a user key names, borrowed from the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity<'a> {
    /// Known by `userId`.
    UserId(&'a str),
    /// Known only by email (`traits.email` of an identify, or `context.traits.email`).
    Email(&'a str),
    /// Known only by `anonymousId`.
    Anonymous(&'a str),
}

impl<'a> Identity<'a> {
    /// Reads a user key's text form as stored (see [`UserKey::as_str`]); `None` for a text
    /// without a known prefix.
    pub fn of_stored(text: &'a str) -> Option<Identity<'a>> {
        if let Some(id) = text.strip_prefix(UserKey::USER_ID) {
            Some(Identity::UserId(id))
        } else if let Some(email) = text.strip_prefix(UserKey::EMAIL) {
            Some(Identity::Email(email))
        } else {
            text.strip_prefix(UserKey::ANONYMOUS)
                .map(Identity::Anonymous)
        }
    }

    /// The id, email or anonymous id itself.
    pub fn value(self) -> &'a str {
        match self {
            Identity::UserId(v) | Identity::Email(v) | Identity::Anonymous(v) => v,
        }
    }

    /// Whether the user is known by id or email (counted as an identified user).
    pub fn is_identified(self) -> bool {
        matches!(self, Identity::UserId(_) | Identity::Email(_))
    }
}

/// The identity the dispatcher keeps a user's order by: a user id, else an email, else an
/// anonymous id. Holds its text form, so storing it costs no formatting.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserKey(String);

impl UserKey {
    const USER_ID: &'static str = "u:";
    const EMAIL: &'static str = "e:";
    const ANONYMOUS: &'static str = "a:";

    fn prefixed(prefix: &str, text: &str) -> UserKey {
        let mut key = String::with_capacity(prefix.len() + text.len());
        key.push_str(prefix);
        key.push_str(text);
        UserKey(key)
    }

    /// The key of a user known by `userId`.
    pub fn user_id(id: &str) -> UserKey {
        UserKey::prefixed(UserKey::USER_ID, id)
    }

    /// The key of a user known only by email.
    pub fn email(email: &str) -> UserKey {
        UserKey::prefixed(UserKey::EMAIL, email)
    }

    /// The key of a user known only by `anonymousId`.
    pub fn anonymous(id: &str) -> UserKey {
        UserKey::prefixed(UserKey::ANONYMOUS, id)
    }

    /// A key read back from a spool, as its [`UserKey::as_str`] wrote it.
    pub fn from_stored(text: impl Into<String>) -> UserKey {
        UserKey(text.into())
    }

    /// The text form the spools store.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text form, owned.
    pub fn into_string(self) -> String {
        self.0
    }

    /// Who the key names; `None` for a stored text without a known prefix.
    pub fn identity(&self) -> Option<Identity<'_>> {
        Identity::of_stored(&self.0)
    }

    /// Whether the user is known by id or email (counted as an identified user).
    pub fn is_identified(&self) -> bool {
        self.identity().is_some_and(Identity::is_identified)
    }

    /// The anonymous id of a user known only by it.
    pub fn anonymous_id(&self) -> Option<&str> {
        match self.identity() {
            Some(Identity::Anonymous(id)) => Some(id),
            _ => None,
        }
    }

    /// How an operator reads the key: `user <id>`, `email <email>`, `anonymous <id>`.
    pub fn describe(&self) -> String {
        match self.identity() {
            Some(Identity::UserId(id)) => format!("user {id}"),
            Some(Identity::Email(email)) => format!("email {email}"),
            Some(Identity::Anonymous(id)) => format!("anonymous {id}"),
            None => self.0.clone(),
        }
    }
}

impl fmt::Display for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for UserKey {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for UserKey {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// A user of a source: the unit the spools hold back while its events are in flight, and
/// the dispatcher orders and throttles by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HoldKey {
    pub source: String,
    pub user: UserKey,
}

impl HoldKey {
    pub fn new(source: &str, user: &UserKey) -> HoldKey {
        HoldKey {
            source: source.to_owned(),
            user: user.clone(),
        }
    }

    /// The text form (`<source>\u{1f}<user key>`) the SQLite spool keys its lanes by.
    pub fn text(source: &str, user: &UserKey) -> String {
        let mut text = String::with_capacity(source.len() + 1 + user.as_str().len());
        text.push_str(source);
        text.push(HOLD_SEPARATOR);
        text.push_str(user.as_str());
        text
    }

    /// The source part of a hold key's text form.
    pub fn source_of_text(text: &str) -> &str {
        text.split(HOLD_SEPARATOR).next().unwrap_or(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_forms_are_the_stored_ones() {
        assert_eq!(UserKey::user_id("42").as_str(), "u:42");
        assert_eq!(UserKey::email("a@example.com").as_str(), "e:a@example.com");
        assert_eq!(UserKey::anonymous("x").as_str(), "a:x");
        let user = UserKey::user_id("42");
        assert_eq!(HoldKey::text("web", &user), "web\u{1f}u:42");
        assert_eq!(HoldKey::source_of_text("web\u{1f}u:42"), "web");
    }

    #[test]
    fn a_stored_key_reads_back_as_its_identity() {
        let key = UserKey::from_stored("e:a@example.com");
        assert_eq!(key, UserKey::email("a@example.com"));
        assert_eq!(key.identity(), Some(Identity::Email("a@example.com")));
        assert!(key.is_identified());
        let anonymous = UserKey::from_stored("a:x");
        assert!(!anonymous.is_identified());
        assert_eq!(anonymous.anonymous_id(), Some("x"));
        assert_eq!(anonymous.describe(), "anonymous x");
        let unknown = UserKey::from_stored("something");
        assert_eq!(unknown.identity(), None);
        assert!(!unknown.is_identified());
        assert_eq!(unknown.describe(), "something");
    }

    #[test]
    fn an_id_holding_a_prefix_or_separator_stays_whole() {
        let key = UserKey::user_id("e:not-an-email");
        assert_eq!(key.identity(), Some(Identity::UserId("e:not-an-email")));
        assert_eq!(UserKey::from_stored(key.as_str()), key);
    }
}
