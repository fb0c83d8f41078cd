//! Header values with request variables: `"{client}"`, `"req={request_id} via {host}"`. `{{` and `}}` are
//! literal braces. An unknown variable, or a byte no header value may hold, is refused when parsed.

/// A request variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    /// The client address (behind trusted proxies, the hop before them).
    Client,
    /// The address of the connection's peer.
    Peer,
    /// The Host the request was routed by, without port.
    Host,
    Method,
    /// The path the client sent.
    Path,
    /// The query string the client sent, without `?` (empty when none).
    Query,
    /// `http` or `https`.
    Scheme,
    /// The request's id (see `listeners[].request_id_header`).
    RequestId,
}

const NAMES: &[(&str, Var)] = &[
    ("client", Var::Client),
    ("peer", Var::Peer),
    ("host", Var::Host),
    ("method", Var::Method),
    ("path", Var::Path),
    ("query", Var::Query),
    ("scheme", Var::Scheme),
    ("request_id", Var::RequestId),
];

/// What a template reads its variables from.
pub trait Vars {
    fn get(&self, v: Var) -> &str;
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(Var),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, String> {
        if let Some(b) = s.bytes().find(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(format!("{s:?} holds the control byte 0x{b:02x}, which no header value may hold"));
        }
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = s;
        while let Some(i) = rest.find(['{', '}']) {
            text.push_str(&rest[..i]);
            let tail = &rest[i..];
            if tail.starts_with("{{") || tail.starts_with("}}") {
                text.push_str(&tail[..1]);
                rest = &tail[2..];
                continue;
            }
            if tail.starts_with('}') {
                return Err(format!("{s:?}: a lone }} (write }}}} for a literal one)"));
            }
            let Some(end) = tail.find('}') else {
                return Err(format!("{s:?}: {{ without its }} (write {{{{ for a literal one)"));
            };
            let name = &tail[1..end];
            let Some((_, var)) = NAMES.iter().find(|(n, _)| *n == name) else {
                let known: Vec<String> = NAMES.iter().map(|(n, _)| format!("{{{n}}}")).collect();
                return Err(format!("{s:?}: no variable {{{name}}} (known: {})", known.join(", ")));
            };
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(Part::Var(*var));
            rest = &tail[end + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template { parts })
    }

    pub fn uses(&self, v: Var) -> bool {
        self.parts.contains(&Part::Var(v))
    }

    /// The value for a request. Control bytes a variable brought in are dropped, so the value is always a valid
    /// header value.
    pub fn expand(&self, vars: &impl Vars) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Var(v) => out.extend(vars.get(*v).chars().filter(|c| !c.is_control() || *c == '\t')),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl Vars for Fixed {
        fn get(&self, v: Var) -> &str {
            match v {
                Var::Client => "203.0.113.9",
                Var::Peer => "10.0.0.2",
                Var::Host => "shop.example",
                Var::Method => "GET",
                Var::Path => "/cart",
                Var::Query => "a=1",
                Var::Scheme => "https",
                Var::RequestId => "bad\r\nid",
            }
        }
    }

    #[test]
    fn variables_expand_and_double_braces_are_literal() {
        let t = Template::parse("{client} via {peer} for {scheme}://{host}{path}?{query} {{x}}").unwrap();
        assert_eq!(t.expand(&Fixed), "203.0.113.9 via 10.0.0.2 for https://shop.example/cart?a=1 {x}");
        assert!(t.uses(Var::Client) && !t.uses(Var::RequestId));
        assert_eq!(Template::parse("plain").unwrap().expand(&Fixed), "plain");
        assert_eq!(Template::parse("").unwrap().expand(&Fixed), "");
    }

    #[test]
    fn a_variable_cannot_smuggle_a_line_break_into_a_header() {
        assert_eq!(Template::parse("id={request_id}").unwrap().expand(&Fixed), "id=badid");
    }

    #[test]
    fn unknown_variables_lone_braces_and_control_bytes_are_refused() {
        let e = Template::parse("{user}").unwrap_err();
        assert!(e.contains("no variable {user}") && e.contains("{client}"), "{e}");
        assert!(Template::parse("{client").unwrap_err().contains("without its }"));
        assert!(Template::parse("a}b").unwrap_err().contains("lone }"));
        assert!(Template::parse("a\nb").unwrap_err().contains("control byte 0x0a"));
    }
}
