//! Walking a spanned TOML tree against the schema: typed getters that record which keys were read, fall back to
//! the schema's defaults, and collect errors with line numbers instead of stopping at the first.

use std::borrow::Cow;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::schema;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    /// The dotted path of the offending key, such as `services.app.balance`.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "line {}: {}", self.line, self.message)
        } else {
            write!(f, "line {}: {}: {}", self.line, self.path, self.message)
        }
    }
}

/// Every problem found in a config file, in line order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} error{} in the config:", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// A file's text as a spanned TOML tree, or its syntax error with its line.
pub fn parse_toml(text: &str) -> Result<Spanned<DeTable<'_>>, ConfigErrors> {
    DeTable::parse(text).map_err(|e| {
        let line = e.span().map_or(1, |s| Cx::new(text).line_of(s.start));
        ConfigErrors(vec![ConfigError { line, path: String::new(), message: format!("invalid TOML: {}", e.message()) }])
    })
}

/// The parse context: line lookup and the error list.
pub struct Cx {
    line_starts: Vec<usize>,
    errors: RefCell<Vec<ConfigError>>,
}

impl Cx {
    pub fn new(text: &str) -> Cx {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Cx { line_starts, errors: RefCell::new(Vec::new()) }
    }

    pub fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset).max(1)
    }

    pub fn error(&self, line: usize, path: &str, message: impl Into<String>) {
        self.errors.borrow_mut().push(ConfigError { line, path: path.to_string(), message: message.into() });
    }

    pub fn ok(&self) -> bool {
        self.errors.borrow().is_empty()
    }

    pub fn finish<T>(self, value: Option<T>) -> Result<T, ConfigErrors> {
        let mut errors = self.errors.into_inner();
        match value {
            Some(v) if errors.is_empty() => Ok(v),
            _ => {
                if errors.is_empty() {
                    errors.push(ConfigError { line: 1, path: String::new(), message: "invalid config".into() });
                }
                errors.sort_by_key(|e| e.line);
                errors.dedup();
                Err(ConfigErrors(errors))
            }
        }
    }
}

/// One TOML table being read as a schema section.
pub struct Table<'a, 'i> {
    cx: &'a Cx,
    section: &'static str,
    path: String,
    table: &'a DeTable<'i>,
    line: usize,
    used: RefCell<Vec<String>>,
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// A TOML integer's value (underscores allowed, in its radix).
fn parse_int(i: &toml::de::DeInteger<'_>) -> Result<i64, std::num::ParseIntError> {
    i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
}

impl<'a, 'i> Table<'a, 'i> {
    pub fn new(cx: &'a Cx, section: &'static str, path: String, table: &'a DeTable<'i>, line: usize) -> Self {
        Table { cx, section, path, table, line, used: RefCell::new(Vec::new()) }
    }

    fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn schema_key(&self, key: &str) -> &'static schema::Key {
        schema::key(self.section, key)
            .unwrap_or_else(|| panic!("key {key:?} of section {:?} is read but not in the schema", self.section))
    }

    /// The raw value of `key`, marking it as known.
    fn raw(&self, key: &str) -> Option<&'a Spanned<DeValue<'i>>> {
        self.schema_key(key);
        self.used.borrow_mut().push(key.to_string());
        self.table.get(key)
    }

    /// The value of `key`, or the schema's default parsed as TOML, with the line to blame.
    fn value(&self, key: &str) -> Option<(Cow<'a, DeValue<'i>>, usize)> {
        match self.raw(key) {
            Some(v) => Some((Cow::Borrowed(v.get_ref()), self.cx.line_of(v.span().start))),
            None => {
                let default = self.schema_key(key).default;
                if default.is_empty() {
                    return None;
                }
                let parsed = DeValue::parse(default).expect("schema defaults are valid TOML");
                Some((Cow::Owned(parsed.into_inner()), self.line))
            }
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.table.get(key).is_some()
    }

    pub fn line(&self) -> usize {
        self.line
    }

    pub fn line_of_key(&self, key: &str) -> usize {
        self.table.get(key).map_or(self.line, |v| self.cx.line_of(v.span().start))
    }

    pub fn invalid(&self, key: &str, message: impl Into<String>) {
        self.cx.error(self.line_of_key(key), &self.key_path(key), message);
    }

    /// A problem with the table as a whole (such as its name), at its line.
    pub fn invalid_table(&self, message: impl Into<String>) {
        self.cx.error(self.line, &self.path, message);
    }

    pub fn required(&self, key: &str) {
        self.cx.error(self.line, &self.key_path(key), "is required");
    }

    fn wrong_type(&self, key: &str, line: usize, want: &str, got: &DeValue<'_>) {
        self.cx.error(line, &self.key_path(key), format!("expected {want}, got {}", type_name(got)));
    }

    pub fn string(&self, key: &str) -> Option<String> {
        let (v, line) = self.value(key)?;
        match v.as_ref() {
            DeValue::String(s) => Some(s.to_string()),
            other => {
                self.wrong_type(key, line, "a string", other);
                None
            }
        }
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        let (v, line) = self.value(key)?;
        match v.as_ref() {
            DeValue::Boolean(b) => Some(*b),
            other => {
                self.wrong_type(key, line, "true or false", other);
                None
            }
        }
    }

    /// An integer within `min..=max`.
    pub fn int_in(&self, key: &str, min: u64, max: u64) -> Option<u64> {
        let (v, line) = self.value(key)?;
        match v.as_ref() {
            DeValue::Integer(i) => match parse_int(i) {
                Ok(n) if n >= 0 && (n as u64) >= min && (n as u64) <= max => Some(n as u64),
                Ok(n) => {
                    self.cx.error(line, &self.key_path(key), format!("{n} is out of range {min}..={max}"));
                    None
                }
                Err(e) => {
                    self.cx.error(line, &self.key_path(key), format!("bad integer: {e}"));
                    None
                }
            },
            other => {
                self.wrong_type(key, line, "an integer", other);
                None
            }
        }
    }

    /// A duration given in milliseconds, within `min_ms..=max_ms`.
    pub fn ms_in(&self, key: &str, min_ms: u64, max_ms: u64) -> Option<Duration> {
        self.int_in(key, min_ms, max_ms).map(Duration::from_millis)
    }

    pub fn addr(&self, key: &str) -> Option<SocketAddr> {
        let raw = self.string(key)?;
        match raw.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.invalid(key, format!("{raw:?} is not an IP address with a port, such as \"127.0.0.1:8080\""));
                None
            }
        }
    }

    pub fn strings(&self, key: &str) -> Option<Vec<String>> {
        let (v, line) = self.value(key)?;
        match v.as_ref() {
            DeValue::Array(items) => {
                // Every bad item is reported, each on its own line, not only the first.
                let mut out = Some(Vec::new());
                for (i, item) in items.iter().enumerate() {
                    match item.get_ref() {
                        DeValue::String(s) => out.iter_mut().for_each(|o| o.push(s.to_string())),
                        other => {
                            let line = self.cx.line_of(item.span().start);
                            self.wrong_type(&format!("{key}[{i}]"), line, "a string", other);
                            out = None;
                        }
                    }
                }
                out
            }
            other => {
                self.wrong_type(key, line, "an array of strings", other);
                None
            }
        }
    }

    /// An array of integers, each within `min..=max`.
    pub fn ints_in(&self, key: &str, min: u64, max: u64) -> Option<Vec<u64>> {
        let (v, line) = self.value(key)?;
        let DeValue::Array(items) = v.as_ref() else {
            self.wrong_type(key, line, "an array of integers", v.as_ref());
            return None;
        };
        // Every bad item is reported, each on its own line, not only the first.
        let mut out = Some(Vec::new());
        for (index, item) in items.iter().enumerate() {
            let (item_key, line) = (format!("{key}[{index}]"), self.cx.line_of(item.span().start));
            let DeValue::Integer(i) = item.get_ref() else {
                self.wrong_type(&item_key, line, "an integer", item.get_ref());
                out = None;
                continue;
            };
            match parse_int(i) {
                Ok(n) if n >= 0 && (n as u64) >= min && (n as u64) <= max => {
                    out.iter_mut().for_each(|o| o.push(n as u64))
                }
                _ => {
                    let message = format!("{} is out of range {min}..={max}", i.as_str());
                    self.cx.error(line, &self.key_path(&item_key), message);
                    out = None;
                }
            }
        }
        out
    }

    /// A table whose values are all strings, in file order.
    pub fn string_map(&self, key: &str) -> Option<Vec<(String, String)>> {
        let (v, line) = self.value(key)?;
        let DeValue::Table(t) = v.as_ref() else {
            self.wrong_type(key, line, "a table of strings", v.as_ref());
            return None;
        };
        let mut out = Vec::new();
        for (k, item) in t.iter() {
            match item.get_ref() {
                DeValue::String(s) => out.push((k.get_ref().to_string(), s.to_string())),
                other => {
                    let at = self.cx.line_of(item.span().start);
                    self.wrong_type(&format!("{key}.{}", k.get_ref()), at, "a string", other);
                    return None;
                }
            }
        }
        Some(out)
    }

    /// The sub-table `key`, or an empty one (so that every key takes its default) when it is absent.
    pub fn table_or_empty(&self, key: &str, section: &'static str) -> Option<Table<'a, 'i>> {
        static EMPTY: std::sync::LazyLock<DeTable<'static>> = std::sync::LazyLock::new(DeTable::new);
        if self.has(key) {
            return self.table(key, section);
        }
        self.raw(key);
        Some(Table::new(self.cx, section, self.key_path(key), &EMPTY, self.line))
    }

    pub fn table(&self, key: &str, section: &'static str) -> Option<Table<'a, 'i>> {
        let v = self.raw(key)?;
        let line = self.cx.line_of(v.span().start);
        match v.get_ref() {
            DeValue::Table(t) => Some(Table::new(self.cx, section, self.key_path(key), t, line)),
            other => {
                self.wrong_type(key, line, "a table", other);
                None
            }
        }
    }

    pub fn array_of_tables(&self, key: &str, section: &'static str) -> Vec<Table<'a, 'i>> {
        let Some(v) = self.raw(key) else { return Vec::new() };
        let line = self.cx.line_of(v.span().start);
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(key, line, "an array of tables", v.get_ref());
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let item_line = self.cx.line_of(item.span().start);
            match item.get_ref() {
                DeValue::Table(t) => {
                    out.push(Table::new(self.cx, section, format!("{}[{i}]", self.key_path(key)), t, item_line))
                }
                other => self.wrong_type(&format!("{key}[{i}]"), item_line, "a table", other),
            }
        }
        out
    }

    pub fn table_of_tables(&self, key: &str, section: &'static str) -> Vec<(String, Table<'a, 'i>)> {
        let Some(outer) = self.table(key, "") else { return Vec::new() };
        let mut out = Vec::new();
        for (name, v) in outer.table.iter() {
            let line = self.cx.line_of(v.span().start);
            let path = format!("{}.{}", outer.path, name.get_ref());
            match v.get_ref() {
                DeValue::Table(t) => {
                    out.push((name.get_ref().to_string(), Table::new(self.cx, section, path, t, line)));
                }
                other => self.cx.error(line, &path, format!("expected a table, got {}", type_name(other))),
            }
        }
        out
    }

    /// Reports every key of this table that the schema does not know.
    pub fn finish(&self) {
        let used = self.used.borrow();
        for (k, v) in self.table.iter() {
            let name = k.get_ref();
            if !used.iter().any(|u| u == name.as_ref()) && schema::key(self.section, name).is_none() {
                let expected = schema::names(self.section).join(", ");
                self.cx.error(
                    self.cx.line_of(k.span().start.min(v.span().start)),
                    &self.key_path(name),
                    format!("unknown key (expected one of: {expected})"),
                );
            }
        }
    }
}
