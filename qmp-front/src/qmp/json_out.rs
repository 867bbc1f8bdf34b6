//! JSON output exactly as QEMU's `qobject_to_json` writes it.
//!
//! - Separators `", "` and `": "`; pretty mode puts every member and element
//!   on its own line, indented by 4 spaces per level (`{` + newline + `}`
//!   for an empty object, as QEMU does).
//! - Object members come in QDict iteration order: by bucket of QEMU's
//!   `tdb_hash(key) % 512`. Within one bucket QEMU lists the most recently
//!   inserted key first; insertion order is not kept by `serde_json::Map`,
//!   so ties are broken by key (documented deviation, rare).
//! - Strings: `"` `\\` `\b` `\f` `\n` `\r` `\t` escaped, other control
//!   characters and all non-ASCII as `\uXXXX` (upper-case hex, surrogate
//!   pairs beyond the BMP).
//! - Floats as C's `%.17g`.

use serde_json::Value;

/// Number of QDict hash buckets in QEMU.
const QDICT_BUCKET_MAX: u32 = 512;

/// QEMU's QDict bucket for a key (`tdb_hash(key) % QDICT_BUCKET_MAX`).
pub fn qdict_bucket(key: &str) -> u32 {
    let b = key.as_bytes();
    let mut v: u32 = 0x238F_13AFu32.wrapping_mul(b.len() as u32);
    for (i, &c) in b.iter().enumerate() {
        v = v.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % QDICT_BUCKET_MAX
}

/// Keys of an object in QEMU's iteration order.
pub fn qdict_order(map: &serde_json::Map<String, Value>) -> Vec<&String> {
    let mut keys: Vec<&String> = map.keys().collect();
    // Hash each key once (a comparator hashing on every comparison
    // dominated large replies such as query-named-block-nodes).
    keys.sort_by_cached_key(|k| (qdict_bucket(k), *k));
    keys
}

/// Serialise `v` as QEMU does; no trailing newline.
pub fn to_json(v: &Value, pretty: bool) -> String {
    let mut s = String::new();
    write_value(&mut s, v, pretty, 0);
    s
}

fn newline(s: &mut String, pretty: bool, indent: usize) {
    if pretty {
        s.push('\n');
        for _ in 0..indent {
            s.push_str("    ");
        }
    }
}

fn write_value(s: &mut String, v: &Value, pretty: bool, indent: usize) {
    match v {
        Value::Null => s.push_str("null"),
        Value::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                s.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                s.push_str(&u.to_string());
            } else {
                s.push_str(&format_g17(n.as_f64().unwrap_or(0.0)));
            }
        }
        Value::String(st) => write_str(s, st),
        Value::Array(a) => {
            s.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    s.push_str(if pretty { "," } else { ", " });
                }
                newline(s, pretty, indent + 1);
                write_value(s, e, pretty, indent + 1);
            }
            newline(s, pretty, indent);
            s.push(']');
        }
        Value::Object(m) => {
            s.push('{');
            for (i, k) in qdict_order(m).into_iter().enumerate() {
                if i > 0 {
                    s.push_str(if pretty { "," } else { ", " });
                }
                newline(s, pretty, indent + 1);
                write_str(s, k);
                s.push_str(": ");
                write_value(s, &m[k], pretty, indent + 1);
            }
            newline(s, pretty, indent);
            s.push('}');
        }
    }
}

fn write_str(s: &mut String, st: &str) {
    s.push('"');
    // Fast path: printable ASCII without quotes or backslashes is copied as is.
    let plain = |b: u8| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\';
    if st.bytes().all(plain) {
        s.push_str(st);
        s.push('"');
        return;
    }
    for ch in st.chars() {
        match ch {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\u{8}' => s.push_str("\\b"),
            '\u{c}' => s.push_str("\\f"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) > 0xffff => {
                let cp = c as u32 - 0x10000;
                s.push_str(&format!(
                    "\\u{:04X}\\u{:04X}",
                    0xd800 + (cp >> 10),
                    0xdc00 + (cp & 0x3ff)
                ));
            }
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                s.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

/// C's `printf("%.17g", v)`.
pub fn format_g17(v: f64) -> String {
    if v.is_nan() {
        return "nan".into();
    }
    if v.is_infinite() {
        return if v < 0.0 { "-inf".into() } else { "inf".into() };
    }
    if v == 0.0 {
        return if v.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    let sci = format!("{:.16e}", v);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..17).contains(&exp) {
        let mant = trim_zeros(mant);
        format!(
            "{}e{}{:02}",
            mant,
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    } else {
        let prec = (16 - exp) as usize;
        trim_zeros(&format!("{:.*}", prec, v)).to_string()
    }
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Expected outputs taken from qemu-storage-daemon 10.0.
    #[test]
    fn matches_qemu_compact() {
        let v = json!({"b":1,"a":2,"id":3,"return":4,"error":5});
        assert_eq!(
            to_json(&v, false),
            r#"{"a": 2, "b": 1, "return": 4, "id": 3, "error": 5}"#
        );
        let greeting = json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}});
        assert_eq!(
            to_json(&greeting, false),
            r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#
        );
        assert_eq!(
            to_json(&json!("\u{e9}\u{1f600}/\u{1}\u{7f}'\""), false),
            r#""\u00E9\uD83D\uDE00/\u0001\u007F'\"""#
        );
        assert_eq!(
            to_json(&json!({"x": [], "y": {}}), false),
            r#"{"x": [], "y": {}}"#
        );
    }

    #[test]
    fn floats_like_printf_g17() {
        for (v, want) in [
            (0.1, "0.10000000000000001"),
            (1e300, "1.0000000000000001e+300"),
            (-0.0, "-0"),
            (1.0, "1"),
            (1.5, "1.5"),
            (1000.0, "1000"),
            (123456789.125, "123456789.125"),
            (1e-7, "9.9999999999999995e-08"),
            (-9.223_372_036_854_776e18, "-9.2233720368547758e+18"),
            (1.8446744073709552e19, "1.8446744073709552e+19"),
            (0.30000000000000004, "0.30000000000000004"),
            (5e-324, "4.9406564584124654e-324"),
        ] {
            assert_eq!(format_g17(v), want, "{v}");
        }
    }

    /// Pretty layout taken from qemu-storage-daemon 10.0 (`pretty=on`),
    /// before the monitor's `\n` -> `\r\n` translation.
    #[test]
    fn matches_qemu_pretty() {
        let v = json!({"return": {}, "id": [1, [], {}, {"a": [2]}]});
        assert_eq!(
            to_json(&v, true),
            "{\n    \"return\": {\n    },\n    \"id\": [\n        1,\n        [\n        ],\n        {\n        },\n        {\n            \"a\": [\n                2\n            ]\n        }\n    ]\n}"
        );
    }
}
