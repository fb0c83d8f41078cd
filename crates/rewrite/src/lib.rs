//! Rewriting a request on its way to a server, as pure functions of the request's parts: [`PathRewrite`] turns
//! the path the client sent into the one the server gets (regex rules first, on the client's path, then the
//! route's prefix stripped or replaced), or into a redirect; [`Template`] makes header values from request
//! variables (`{client}`, `{host}`, `{request_id}`, ...); [`HeaderRules`] removes, sets and adds headers.
//!
//! Everything is checked when the config is read (a bad regex, an unknown variable, a header value no server
//! could read), so that nothing here fails on a request.

mod path;
mod template;

pub use path::{PathRewrite, Prefix, Rewritten, Rule, REDIRECT_STATUSES};
pub use template::{Template, Var, Vars};

/// The regex engine the rules use (so that the config builds them with the same one).
pub use regex;

/// Headers to remove, set (replacing any the request or response had) and add (beside them), in that order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderRules {
    /// Lower-case names.
    pub remove: Vec<String>,
    pub set: Vec<(String, Template)>,
    pub add: Vec<(String, Template)>,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Whether any value uses `v`.
    pub fn uses(&self, v: Var) -> bool {
        self.set.iter().chain(&self.add).any(|(_, t)| t.uses(v))
    }
}

/// An HTTP token (RFC 9110 §5.6.2), such as a header name.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Header names a rule may not touch: they frame the message or the connection, and the proxy owns them.
pub const RESERVED_HEADERS: &[&str] =
    &["content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer", "host"];
