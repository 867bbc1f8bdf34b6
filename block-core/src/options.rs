//! Driver options as a typed tree, QEMU's QDict for block nodes.
//!
//! The command line's key=value syntax and QMP's JSON both become an
//! [`Options`] tree before a driver sees them, so drivers parse options in
//! one way. Drivers take the members they understand ([`Options::take_str`],
//! ...) and the opener rejects whatever is left over, so a misspelt option is
//! an error, never silently ignored.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// One option value.
#[derive(Debug, Clone, PartialEq)]
pub enum OptValue {
    /// A string; also how key=value input arrives before conversion.
    Str(String),
    /// A number.
    Int(i64),
    /// An unsigned number too large for `Int`.
    UInt(u64),
    /// A boolean.
    Bool(bool),
    /// A nested set of options (e.g. an inline child node definition).
    Map(Options),
    /// A list.
    List(Vec<OptValue>),
    /// JSON null (QEMU uses it for "no backing file").
    Null,
}

/// A set of named option values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Options {
    map: BTreeMap<String, OptValue>,
}

fn type_error(key: &str, want: &str) -> Error {
    Error::invalid(format!(
        "Invalid parameter type for '{key}', expected: {want}"
    ))
}

impl Options {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builder-style insert.
    pub fn with(mut self, key: &str, v: impl Into<OptValue>) -> Self {
        self.insert(key, v);
        self
    }

    /// Inserts `key`; a dotted key (`file.filename`) creates nested maps.
    pub fn insert(&mut self, key: &str, v: impl Into<OptValue>) {
        match key.split_once('.') {
            Some((head, rest)) => {
                let e = self
                    .map
                    .entry(head.to_owned())
                    .or_insert_with(|| OptValue::Map(Options::new()));
                if let OptValue::Map(m) = e {
                    m.insert(rest, v);
                } else {
                    let mut m = Options::new();
                    m.insert(rest, v);
                    *e = OptValue::Map(m);
                }
            }
            None => {
                self.map.insert(key.to_owned(), v.into());
            }
        }
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Looks at a value without taking it.
    pub fn get(&self, key: &str) -> Option<&OptValue> {
        self.map.get(key)
    }

    /// Removes and returns a raw value.
    pub fn take(&mut self, key: &str) -> Option<OptValue> {
        self.map.remove(key)
    }

    /// Takes a string member.
    pub fn take_str(&mut self, key: &str) -> Result<Option<String>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(OptValue::Str(s)) => Ok(Some(s)),
            Some(_) => Err(type_error(key, "string")),
        }
    }

    /// Takes a boolean; key=value input accepts `on`/`off` (and QEMU's
    /// `true`/`false`, `yes`/`no`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(OptValue::Bool(b)) => Ok(Some(b)),
            Some(OptValue::Str(s)) => match s.as_str() {
                "on" | "true" | "yes" | "y" => Ok(Some(true)),
                "off" | "false" | "no" | "n" => Ok(Some(false)),
                _ => Err(Error::invalid(format!(
                    "Parameter '{key}' expects 'on' or 'off'"
                ))),
            },
            Some(_) => Err(type_error(key, "boolean")),
        }
    }

    /// Takes an unsigned number; strings accept size suffixes (k, M, G, T, P, E).
    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(OptValue::Int(i)) if i >= 0 => Ok(Some(i as u64)),
            Some(OptValue::UInt(u)) => Ok(Some(u)),
            Some(OptValue::Str(s)) => parse_size(&s).map(Some).ok_or_else(|| {
                Error::invalid(format!(
                    "Parameter '{key}' expects a non-negative number below 2^64"
                ))
            }),
            Some(_) => Err(type_error(key, "integer")),
        }
    }

    /// Takes a nested map.
    pub fn take_map(&mut self, key: &str) -> Result<Option<Options>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(OptValue::Map(m)) => Ok(Some(m)),
            Some(_) => Err(type_error(key, "object")),
        }
    }

    /// Errors if any member was not taken by the driver.
    pub fn finish(self, driver: &str) -> Result<()> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(Error::invalid(format!(
                "Block format '{driver}' does not support the option '{k}'"
            ))),
        }
    }

    /// Iterates over members.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &OptValue)> {
        self.map.iter()
    }

    /// Whether there is no member.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl From<&str> for OptValue {
    fn from(s: &str) -> Self {
        OptValue::Str(s.to_owned())
    }
}
impl From<String> for OptValue {
    fn from(s: String) -> Self {
        OptValue::Str(s)
    }
}
impl From<bool> for OptValue {
    fn from(b: bool) -> Self {
        OptValue::Bool(b)
    }
}
impl From<i64> for OptValue {
    fn from(i: i64) -> Self {
        OptValue::Int(i)
    }
}
impl From<u64> for OptValue {
    fn from(u: u64) -> Self {
        i64::try_from(u).map_or(OptValue::UInt(u), OptValue::Int)
    }
}
impl From<Options> for OptValue {
    fn from(m: Options) -> Self {
        OptValue::Map(m)
    }
}

/// Parses a size as QEMU does: a number with an optional binary suffix
/// (`k`/`K`, `M`, `G`, `T`, `P`, `E`; `b`/`B` for bytes). Fractions are
/// accepted with a suffix ("1.5G").
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return None;
    }
    let mult: u64 = match suffix {
        "" | "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return None,
    };
    if num.contains('.') {
        if mult == 1 {
            return None;
        }
        let f: f64 = num.parse().ok()?;
        let v = f * mult as f64;
        if !(0.0..1.8446744073709552e19).contains(&v) {
            return None;
        }
        Some(v as u64)
    } else {
        num.parse::<u64>().ok()?.checked_mul(mult)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("1.5M"), Some(3 << 19));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("1Q"), None);
        assert_eq!(parse_size("99999999999999999999"), None);
        assert_eq!(parse_size("16E"), None);
    }

    #[test]
    fn nested_and_leftovers() {
        let mut o = Options::new()
            .with("driver", "raw")
            .with("file.driver", "file")
            .with("file.filename", "/x");
        assert_eq!(o.take_str("driver").unwrap().as_deref(), Some("raw"));
        let mut f = o.take_map("file").unwrap().unwrap();
        assert_eq!(f.take_str("filename").unwrap().as_deref(), Some("/x"));
        let e = f.finish("file").unwrap_err();
        assert!(e.to_string().contains("'driver'"));
        o.finish("raw").unwrap();
    }

    #[test]
    fn bools() {
        let mut o = Options::new()
            .with("a", "on")
            .with("b", "maybe")
            .with("c", 3i64);
        assert_eq!(o.take_bool("a").unwrap(), Some(true));
        assert!(o.take_bool("b").is_err());
        assert!(o.take_bool("c").is_err());
    }
}
