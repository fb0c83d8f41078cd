//! Scenario files: weighted flows of steps, each step a request built from templates (`{{seq}}`, `{{uuid}}`,
//! `{{random_int}}` and variables captured from earlier JSON responses), with checks and think time.
//!
//! ```toml
//! [[flow]]
//! name = "order"
//! weight = 1
//!
//! [[flow.step]]
//! method = "POST"
//! url = "/orders"
//! headers = { "Idempotency-Key" = "{{uuid}}" }
//! json = { item = "book-{{seq}}", qty = 1 }
//! capture = { order_id = "id" }
//! check = { status = 201, body_contains = "book", json_path = "qty", json_equals = 1 }
//!
//! [[flow.step]]
//! url = "/orders/{{order_id}}"
//! think_ms = 100
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::h1::request_bytes;
use crate::run::render_with;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    flow: Vec<RawFlow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlow {
    name: String,
    #[serde(default = "one")]
    weight: u32,
    step: Vec<RawStep>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[serde(default = "get")]
    method: String,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    json: Option<toml::Value>,
    body: Option<String>,
    #[serde(default)]
    capture: BTreeMap<String, String>,
    check: Option<Check>,
    #[serde(default)]
    think_ms: u64,
}

fn get() -> String {
    "GET".into()
}

/// What a step's response must satisfy; a failed check counts the request as failed.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub status: Option<u16>,
    pub body_contains: Option<String>,
    pub json_path: Option<String>,
    pub json_equals: Option<toml::Value>,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub method: http::Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    /// The body template (JSON text or raw), if any.
    pub body: Option<String>,
    pub json: bool,
    pub capture: Vec<(String, String)>,
    pub check: Check,
    pub think_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Flow {
    pub name: String,
    pub weight: u32,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub flows: Vec<Flow>,
    total_weight: u32,
}

/// Why a scenario file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{0}")]
    Toml(String),
    #[error("flow {flow:?}, step {step}: {message}")]
    Step { flow: String, step: usize, message: String },
    #[error("flow {0:?}: {1}")]
    Flow(String, String),
}

fn toml_to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => Value::from(*f),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(t.iter().map(|(k, v)| (k.clone(), toml_to_json(v))).collect()),
    }
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let raw: RawScenario = toml::from_str(text).map_err(|e| ScenarioError::Toml(e.to_string()))?;
        let mut flows = Vec::new();
        for f in raw.flow {
            if f.step.is_empty() {
                return Err(ScenarioError::Flow(f.name, "has no steps".into()));
            }
            if f.weight == 0 {
                return Err(ScenarioError::Flow(f.name, "weight must be at least 1".into()));
            }
            let mut steps = Vec::new();
            for (i, s) in f.step.into_iter().enumerate() {
                let err = |message: String| ScenarioError::Step { flow: f.name.clone(), step: i + 1, message };
                let method: http::Method =
                    s.method.to_ascii_uppercase().parse().map_err(|_| err(format!("bad method {:?}", s.method)))?;
                if !s.url.starts_with('/') {
                    return Err(err(format!("url {:?} must be a path starting with /", s.url)));
                }
                if s.json.is_some() && s.body.is_some() {
                    return Err(err("give json or body, not both".into()));
                }
                if s.check.as_ref().is_some_and(|c| c.json_equals.is_some() != c.json_path.is_some()) {
                    return Err(err("check.json_path and check.json_equals go together".into()));
                }
                let (body, json) = match (&s.json, s.body) {
                    (Some(j), _) => (Some(toml_to_json(j).to_string()), true),
                    (None, b) => (b, false),
                };
                let mut headers: Vec<(String, String)> = s.headers.into_iter().collect();
                if json && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
                    headers.push(("content-type".into(), "application/json".into()));
                }
                steps.push(Step {
                    method,
                    url: s.url,
                    headers,
                    body,
                    json,
                    capture: s.capture.into_iter().collect(),
                    check: s.check.unwrap_or_default(),
                    think_ms: s.think_ms,
                });
            }
            flows.push(Flow { name: f.name, weight: f.weight, steps });
        }
        if flows.is_empty() {
            return Err(ScenarioError::Toml("no [[flow]]".into()));
        }
        let total_weight = flows.iter().map(|f| f.weight).sum();
        Ok(Scenario { flows, total_weight })
    }

    /// Picks a flow by weight.
    pub fn pick(&self, rng: &mut fastrand::Rng) -> &Flow {
        &self.flows[self.pick_index(rng)]
    }

    /// The index in `flows` of a flow chosen by weight.
    pub fn pick_index(&self, rng: &mut fastrand::Rng) -> usize {
        let mut x = rng.u32(..self.total_weight);
        for (i, f) in self.flows.iter().enumerate() {
            if x < f.weight {
                return i;
            }
            x -= f.weight;
        }
        0
    }
}

impl Step {
    /// The request's bytes, with templates filled from `vars`.
    pub fn bytes(
        &self,
        authority: &str,
        seq: u64,
        rng: &mut fastrand::Rng,
        vars: &BTreeMap<String, String>,
    ) -> Vec<u8> {
        let url = render_with(&self.url, seq, rng, vars);
        let headers: Vec<(String, String)> =
            self.headers.iter().map(|(k, v)| (k.clone(), render_with(v, seq, rng, vars))).collect();
        let body = self.body.as_deref().map(|b| render_with(b, seq, rng, vars)).unwrap_or_default();
        request_bytes(self.method.as_str(), &url, authority, &headers, body.as_bytes(), false)
    }

    /// Whether the response satisfies the step's check; on success, captures its variables into `vars`.
    pub fn judge(&self, status: u16, body: &[u8], vars: &mut BTreeMap<String, String>) -> bool {
        let c = &self.check;
        if c.status.is_some_and(|s| s != status) {
            return false;
        }
        if let Some(text) = &c.body_contains {
            if !String::from_utf8_lossy(body).contains(text.as_str()) {
                return false;
            }
        }
        let needs_json = c.json_path.is_some() || !self.capture.is_empty();
        let json: Option<Value> = if needs_json { serde_json::from_slice(body).ok() } else { None };
        if let (Some(path), Some(want)) = (&c.json_path, &c.json_equals) {
            if json.as_ref().and_then(|j| lookup(j, path)) != Some(&toml_to_json(want)) {
                return false;
            }
        }
        for (var, path) in &self.capture {
            match json.as_ref().and_then(|j| lookup(j, path)) {
                Some(Value::String(s)) => {
                    vars.insert(var.clone(), s.clone());
                }
                Some(v) => {
                    vars.insert(var.clone(), v.to_string());
                }
                None => return false,
            }
        }
        true
    }

    /// Whether this step needs the response body.
    pub fn reads_body(&self) -> bool {
        self.check.body_contains.is_some() || self.check.json_path.is_some() || !self.capture.is_empty()
    }
}

/// A dotted path into JSON: `id`, `order.items.0.name`.
fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.trim_start_matches("$.").split('.').filter(|p| !p.is_empty()).try_fold(v, |v, key| match v {
        Value::Object(m) => m.get(key),
        Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[flow]]
name = "order"
weight = 3
[[flow.step]]
method = "post"
url = "/orders"
headers = { "Idempotency-Key" = "{{uuid}}" }
json = { item = "book-{{seq}}", qty = 2 }
capture = { order_id = "id" }
check = { status = 201, json_path = "qty", json_equals = 2 }
[[flow.step]]
url = "/orders/{{order_id}}"
think_ms = 5

[[flow]]
name = "home"
[[flow.step]]
url = "/"
check = { body_contains = "version" }
"#;

    #[test]
    fn parses_and_picks_by_weight() {
        let s = Scenario::parse(EXAMPLE).unwrap();
        assert_eq!(s.flows.len(), 2);
        assert!(s.flows[0].steps[0].json);
        let mut rng = fastrand::Rng::with_seed(1);
        let orders = (0..4000).filter(|_| s.pick(&mut rng).name == "order").count();
        assert!((2800..3200).contains(&orders), "{orders}");
    }

    #[test]
    fn renders_checks_and_captures() {
        let s = Scenario::parse(EXAMPLE).unwrap();
        let (post, get) = (&s.flows[0].steps[0], &s.flows[0].steps[1]);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut vars = BTreeMap::new();
        let bytes = String::from_utf8(post.bytes("h", 7, &mut rng, &vars)).unwrap();
        assert!(bytes.starts_with("POST /orders HTTP/1.1\r\n"), "{bytes}");
        assert!(bytes.contains("\"item\":\"book-7\""), "{bytes}");
        assert!(bytes.contains("content-type: application/json"), "{bytes}");
        assert!(!bytes.contains("{{uuid}}"));
        assert!(post.judge(201, br#"{"id":42,"qty":2}"#, &mut vars));
        assert_eq!(vars["order_id"], "42");
        assert!(String::from_utf8(get.bytes("h", 8, &mut rng, &vars)).unwrap().starts_with("GET /orders/42 "));
        assert!(!post.judge(200, br#"{"id":1,"qty":2}"#, &mut vars), "wrong status");
        assert!(!post.judge(201, br#"{"id":1,"qty":3}"#, &mut vars), "wrong JSON field");
        assert!(!post.judge(201, br#"{"qty":2}"#, &mut vars), "nothing to capture");
    }

    #[test]
    fn refuses_bad_scenarios() {
        assert!(Scenario::parse("[[flow]]\nname = \"x\"\nstep = []\n").is_err());
        assert!(Scenario::parse("[[flow]]\nname = \"x\"\n[[flow.step]]\nurl = \"nope\"\n").is_err());
        let e = Scenario::parse("[[flow]]\nname = \"x\"\n[[flow.step]]\nurl = \"/\"\ncolour = 1\n").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
