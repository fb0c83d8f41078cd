//! The path a server gets. Rules are tried in order on the path the client sent; the first whose regex matches
//! (anywhere, unless anchored with `^` and `$`) gives the new path, its `to` with `$1`, `${name}` standing for
//! the regex's groups, as nginx's `rewrite` does: the whole path is replaced, not only the part that matched. With
//! a redirect status it answers the client instead, with `Location` set to it. Then the route's prefix is stripped or replaced, if the path still starts
//! with it. A replacement that holds a `?` sets the query; the client's query is then appended after `&` (as
//! nginx does); without one, the client's query stays as it was.

use regex::Regex;

/// The statuses a redirect may have.
pub const REDIRECT_STATUSES: &[u16] = &[301, 302, 303, 307, 308];

#[derive(Debug, Clone)]
pub struct Rule {
    pub re: Regex,
    /// The replacement, in `regex`'s syntax (`$1`, `${name}`, `$$` for a dollar).
    pub to: String,
    /// Answer with this status and `Location` instead of forwarding.
    pub redirect: Option<u16>,
}

impl PartialEq for Rule {
    fn eq(&self, o: &Rule) -> bool {
        self.re.as_str() == o.re.as_str() && self.to == o.to && self.redirect == o.redirect
    }
}

impl Eq for Rule {}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Prefix {
    /// The path goes on as it is.
    #[default]
    Keep,
    /// The route's prefix is cut off (`/api/users` under `/api` becomes `/users`).
    Strip(String),
    /// The prefix is replaced by the second (`/api/users` under `/api`, replaced by `/v2`, becomes `/v2/users`).
    Replace(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PathRewrite {
    pub rules: Vec<Rule>,
    pub prefix: Prefix,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewritten {
    /// Forward as the client asked.
    Unchanged,
    /// Forward with this path and query (the request target, as `/path?query`).
    Target(String),
    Redirect {
        status: u16,
        location: String,
    },
}

impl PathRewrite {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.prefix == Prefix::Keep
    }

    /// What becomes of a request for `path` with `query`.
    pub fn apply(&self, path: &str, query: Option<&str>) -> Rewritten {
        let mut target: Option<(String, Option<String>)> = None;
        for rule in &self.rules {
            let Some(caps) = rule.re.captures(path) else { continue };
            let mut replaced = String::with_capacity(rule.to.len() + path.len());
            caps.expand(&rule.to, &mut replaced);
            let (p, q) = with_query(replaced, query);
            if let Some(status) = rule.redirect {
                let location = match q {
                    Some(q) => format!("{p}?{q}"),
                    None => p,
                };
                return Rewritten::Redirect { status, location };
            }
            target = Some((p, q));
            break;
        }
        let (p, q) = match target {
            Some((p, q)) => (p, q),
            None if self.prefix == Prefix::Keep => return Rewritten::Unchanged,
            None => (path.to_string(), query.map(str::to_string)),
        };
        let p = match &self.prefix {
            Prefix::Keep => p,
            Prefix::Strip(prefix) => match p.strip_prefix(prefix.as_str()) {
                Some(rest) => rooted("", rest),
                None => p,
            },
            Prefix::Replace(prefix, with) => match p.strip_prefix(prefix.as_str()) {
                Some(rest) => rooted(with, rest),
                None => p,
            },
        };
        let p = if p.is_empty() { "/".to_string() } else { p };
        Rewritten::Target(match q {
            Some(q) => format!("{p}?{q}"),
            None => p,
        })
    }
}

/// `head` then `rest`, with one slash between them, starting with a slash.
fn rooted(head: &str, rest: &str) -> String {
    let head = head.trim_end_matches('/');
    let rest = rest.trim_start_matches('/');
    let mut out = String::with_capacity(head.len() + rest.len() + 2);
    if !head.starts_with('/') {
        out.push('/');
    }
    out.push_str(head);
    if !rest.is_empty() {
        if !out.ends_with('/') {
            out.push('/');
        }
        out.push_str(rest);
    }
    out
}

/// Splits a replacement into path and query, appending the client's query to one the replacement set.
fn with_query(replaced: String, query: Option<&str>) -> (String, Option<String>) {
    let client = query.filter(|q| !q.is_empty());
    match replaced.split_once('?') {
        Some((p, q)) => {
            let q = match (q.is_empty(), client) {
                (true, c) => c.map(str::to_string),
                (false, Some(c)) => Some(format!("{q}&{c}")),
                (false, None) => Some(q.to_string()),
            };
            (p.to_string(), q)
        }
        None => (replaced, client.map(str::to_string)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(re: &str, to: &str, redirect: Option<u16>) -> Rule {
        Rule { re: Regex::new(re).unwrap(), to: to.into(), redirect }
    }

    #[test]
    fn a_stripped_prefix_leaves_a_rooted_path_and_the_query() {
        let r = PathRewrite { rules: vec![], prefix: Prefix::Strip("/api".into()) };
        assert_eq!(r.apply("/api/users", Some("page=2")), Rewritten::Target("/users?page=2".into()));
        assert_eq!(r.apply("/api", None), Rewritten::Target("/".into()));
        assert_eq!(r.apply("/api/", None), Rewritten::Target("/".into()));
        let r = PathRewrite { rules: vec![], prefix: Prefix::Strip("/api/".into()) };
        assert_eq!(r.apply("/api/users", None), Rewritten::Target("/users".into()));
    }

    #[test]
    fn a_replaced_prefix_joins_with_one_slash() {
        let r = PathRewrite { rules: vec![], prefix: Prefix::Replace("/api".into(), "/v2/".into()) };
        assert_eq!(r.apply("/api/users", None), Rewritten::Target("/v2/users".into()));
        assert_eq!(r.apply("/api", None), Rewritten::Target("/v2".into()));
        let r = PathRewrite { rules: vec![], prefix: Prefix::Replace("/api".into(), "/".into()) };
        assert_eq!(r.apply("/api/x", None), Rewritten::Target("/x".into()));
    }

    #[test]
    fn the_first_matching_rule_rewrites_and_a_redirect_rule_answers() {
        let r = PathRewrite {
            rules: vec![
                rule("^/old/(.*)$", "https://new.example/$1", Some(301)),
                rule("^/u/(?P<id>[0-9]+)$", "/users?id=${id}", None),
                rule("^/u/", "/never", None),
            ],
            prefix: Prefix::Keep,
        };
        assert_eq!(
            r.apply("/old/a/b", Some("x=1")),
            Rewritten::Redirect { status: 301, location: "https://new.example/a/b?x=1".into() }
        );
        assert_eq!(r.apply("/u/42", Some("full=1")), Rewritten::Target("/users?id=42&full=1".into()));
        assert_eq!(r.apply("/u/42", None), Rewritten::Target("/users?id=42".into()));
        assert_eq!(r.apply("/u/abc", None), Rewritten::Target("/never".into()));
        assert_eq!(r.apply("/other", Some("q")), Rewritten::Unchanged);
    }

    #[test]
    fn rules_see_the_clients_path_and_the_prefix_applies_after_them() {
        let r = PathRewrite {
            rules: vec![rule("^/api/v1/(.*)$", "/api/v2/$1", None)],
            prefix: Prefix::Strip("/api".into()),
        };
        assert_eq!(r.apply("/api/v1/users", None), Rewritten::Target("/v2/users".into()));
        assert_eq!(r.apply("/api/v2/users", None), Rewritten::Target("/v2/users".into()));
        // A rule that moved the path out of the prefix leaves it alone.
        let r =
            PathRewrite { rules: vec![rule("^/api/legacy$", "/legacy", None)], prefix: Prefix::Strip("/api".into()) };
        assert_eq!(r.apply("/api/legacy", None), Rewritten::Target("/legacy".into()));
    }

    #[test]
    fn a_replacement_ending_in_a_question_mark_keeps_only_the_clients_query() {
        let r = PathRewrite { rules: vec![rule("^/s$", "/search?", None)], prefix: Prefix::Keep };
        assert_eq!(r.apply("/s", Some("q=x")), Rewritten::Target("/search?q=x".into()));
        assert_eq!(r.apply("/s", None), Rewritten::Target("/search".into()));
    }
}
