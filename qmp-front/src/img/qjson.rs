//! JSON printed the way QEMU's `qobject_to_json_pretty` prints it.
//!
//! QEMU builds its output from a QDict, a hash table of 512 buckets keyed
//! by `tdb_hash`; printing walks the buckets in order and each bucket from
//! its most recently inserted key. To print the same bytes, a [`QValue::Dict`]
//! keeps its keys in QAPI insertion order and [`QValue::pretty`] reorders
//! them exactly as the hash table would.

/// A QObject.
#[derive(Debug, Clone, PartialEq)]
pub enum QValue {
    /// `QNum` holding an integer.
    Int(i64),
    /// `QBool`.
    Bool(bool),
    /// `QString`.
    Str(String),
    /// `QList`.
    List(Vec<QValue>),
    /// `QDict`, keys in insertion order.
    Dict(Vec<(String, QValue)>),
}

const BUCKETS: u32 = 512;

/// QEMU's `tdb_hash`, reduced to a bucket index.
fn bucket(key: &str) -> u32 {
    let mut v = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, &c) in key.as_bytes().iter().enumerate() {
        v = v.wrapping_add((c as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % BUCKETS
}

fn indent(out: &mut String, level: usize) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04X}", c as u32))
            }
            c if (c as u32) > 0xffff => {
                let v = c as u32 - 0x10000;
                out.push_str(&format!(
                    "\\u{:04X}\\u{:04X}",
                    0xd800 + (v >> 10),
                    0xdc00 + (v & 0x3ff)
                ));
            }
            c if (c as u32) >= 0x80 => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Indexes of `entries` in the order a QDict holding them is walked.
pub fn dict_order(entries: &[(String, QValue)]) -> Vec<usize> {
    let mut order: Vec<(u32, usize)> = entries
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (bucket(k), i))
        .collect();
    // Within a bucket the newest key comes first.
    order.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    order.into_iter().map(|(_, i)| i).collect()
}

impl QValue {
    /// Shorthand for a string value.
    pub fn str(s: impl Into<String>) -> QValue {
        QValue::Str(s.into())
    }

    /// The same value for serde users (the daemon's QMP answers), keys in
    /// insertion order.
    pub fn to_value(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            QValue::Int(i) => Value::from(*i),
            QValue::Bool(b) => Value::Bool(*b),
            QValue::Str(s) => Value::String(s.clone()),
            QValue::List(items) => Value::Array(items.iter().map(QValue::to_value).collect()),
            QValue::Dict(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_value()))
                    .collect(),
            ),
        }
    }

    /// The pretty-printed text (no trailing newline).
    pub fn pretty(&self) -> String {
        let mut s = String::new();
        self.write(&mut s, 0);
        s
    }

    fn write(&self, out: &mut String, level: usize) {
        match self {
            QValue::Int(i) => out.push_str(&i.to_string()),
            QValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            QValue::Str(s) => quote(out, s),
            QValue::List(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    indent(out, level + 1);
                    v.write(out, level + 1);
                }
                indent(out, level);
                out.push(']');
            }
            QValue::Dict(entries) => {
                out.push('{');
                for (n, i) in dict_order(entries).into_iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    indent(out, level + 1);
                    let (k, v) = &entries[i];
                    quote(out, k);
                    out.push_str(": ");
                    v.write(out, level + 1);
                }
                indent(out, level);
                out.push('}');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_qdict_buckets() {
        let d = QValue::Dict(vec![
            ("filename".into(), QValue::str("a")),
            ("format".into(), QValue::str("qcow2")),
            ("check-errors".into(), QValue::Int(0)),
            ("image-end-offset".into(), QValue::Int(5)),
        ]);
        assert_eq!(
            d.pretty(),
            "{\n    \"image-end-offset\": 5,\n    \"check-errors\": 0,\n    \"filename\": \"a\",\n    \"format\": \"qcow2\"\n}"
        );
        assert_eq!(QValue::List(vec![]).pretty(), "[\n]");
    }
}
