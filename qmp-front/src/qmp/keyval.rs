//! QEMU's dotted key=value option syntax (util/keyval.c), as used by
//! qemu-storage-daemon's `--blockdev`, `--object`, `--chardev`, `--monitor`,
//! `--export` and `--nbd-server`, plus the JSON form (`--blockdev '{...}'`).
//!
//! [`parse`] yields a tree of strings, objects and lists (`a.0=x,a.1=y`);
//! [`parse_option`] then converts it to the target type's expectations
//! through the schema's keyval mode ("on"/"off", integers, sizes with
//! suffixes). Error texts are QEMU 10's. Pure functions, no state.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::json_out::qdict_order;
use super::json_stream::parse_str;
use super::schema::{parse_as, InputMode, SchemaType};

/// A key=value syntax error, with QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyvalError(pub String);

/// Length of a QAPI name at the start of `s` (QEMU's `parse_qapi_name`
/// without completeness check), or 0.
fn qapi_name_len(s: &[u8]) -> usize {
    let mut i = 0;
    if s.starts_with(b"__") {
        // Downstream extension prefix: __RFQDN_
        let mut j = 2;
        while j < s.len() && (s[j].is_ascii_alphanumeric() || s[j] == b'.' || s[j] == b'-') {
            j += 1;
        }
        if j >= s.len() || s[j] != b'_' {
            return 0;
        }
        i = j + 1;
    }
    if i >= s.len() || !s[i].is_ascii_alphabetic() {
        return 0;
    }
    while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'-' || s[i] == b'_') {
        i += 1;
    }
    i
}

fn index_len(s: &[u8]) -> usize {
    s.iter().take_while(|c| c.is_ascii_digit()).count()
}

fn is_index(k: &str) -> bool {
    !k.is_empty() && k.bytes().all(|c| c.is_ascii_digit())
}

fn put(
    cur: &mut Map<String, Value>,
    key: &str,
    val: Option<String>,
    shown: &str,
) -> Result<(), KeyvalError> {
    match (cur.get(key), &val) {
        (Some(Value::String(_)), Some(_)) | (None, _) | (Some(Value::Object(_)), None) => {}
        _ => {
            return Err(KeyvalError(format!(
                "Parameters '{shown}.*' used inconsistently"
            )))
        }
    }
    match val {
        Some(v) => {
            cur.insert(key.to_string(), Value::String(v));
        }
        None => {
            cur.entry(key.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
        }
    }
    Ok(())
}

fn parse_one<'a>(
    root: &mut Map<String, Value>,
    params: &'a str,
    implied: Option<&str>,
) -> Result<&'a str, KeyvalError> {
    let len = params.find(['=', ',']).unwrap_or(params.len());
    let implied = implied.filter(|_| len > 0 && params.as_bytes().get(len) != Some(&b'='));
    let key: &str = implied.unwrap_or(&params[..len]);
    let kb = key.as_bytes();
    let mut frags: Vec<&str> = Vec::new();
    let mut s = 0;
    loop {
        let n = if s != 0 && index_len(&kb[s..]) > 0 {
            index_len(&kb[s..])
        } else {
            qapi_name_len(&kb[s..])
        };
        if n == 0 || (s + n < kb.len() && kb[s + n] != b'.') {
            return Err(KeyvalError(format!("Invalid parameter '{key}'")));
        }
        if n >= 128 {
            let frag = if s != 0 || s + n != kb.len() {
                " fragment"
            } else {
                ""
            };
            return Err(KeyvalError(format!(
                "Parameter{frag} '{}' is too long",
                &key[s..s + n]
            )));
        }
        frags.push(&key[s..s + n]);
        s += n;
        if s >= kb.len() {
            break;
        }
        s += 1; // '.'
    }
    // Value
    let rest = match implied {
        Some(_) => params,
        None => {
            let r = &params[len..];
            match r.strip_prefix('=') {
                Some(r) => r,
                None => return Err(KeyvalError(format!("Expected '=' after parameter '{key}'"))),
            }
        }
    };
    let mut val = String::new();
    let mut it = rest.char_indices().peekable();
    let mut consumed = rest.len();
    while let Some((i, c)) = it.next() {
        if c == ',' {
            if let Some(&(_, ',')) = it.peek() {
                it.next();
            } else {
                consumed = i + 1;
                break;
            }
        }
        val.push(c);
    }
    // Walk/create intermediate objects.
    let mut cur = root;
    let mut shown_len = 0;
    for f in &frags[..frags.len() - 1] {
        shown_len += f.len();
        put(cur, f, None, &key[..shown_len])?;
        shown_len += 1;
        cur = match cur.get_mut(*f) {
            Some(Value::Object(m)) => m,
            _ => {
                return Err(KeyvalError(format!(
                    "Parameters '{}.*' used inconsistently",
                    &key[..shown_len - 1]
                )))
            }
        };
    }
    let last = frags[frags.len() - 1];
    put(cur, last, Some(val), key)?;
    Ok(&rest[consumed..])
}

fn listify(cur: Map<String, Value>, path: &str) -> Result<Value, KeyvalError> {
    let mut has_index = false;
    let mut has_member = false;
    let mut out = Map::new();
    let order: Vec<String> = qdict_order(&cur).into_iter().cloned().collect();
    let mut cur = cur;
    for k in order {
        let v = cur.remove(&k).unwrap_or(Value::Null);
        if is_index(&k) {
            has_index = true;
        } else {
            has_member = true;
        }
        let v = match v {
            Value::Object(m) => listify(m, &format!("{path}{k}."))?,
            other => other,
        };
        out.insert(k, v);
    }
    if has_index && has_member {
        return Err(KeyvalError(format!(
            "Parameters '{path}*' used inconsistently"
        )));
    }
    if !has_index {
        return Ok(Value::Object(out));
    }
    let n = out.len();
    let mut elts: Vec<Option<Value>> = vec![None; n];
    let mut max = 0usize;
    for (k, v) in out {
        let idx = k.parse::<usize>().unwrap_or(usize::MAX);
        max = max.max(idx.saturating_add(1));
        if idx < n {
            elts[idx] = Some(v);
        }
    }
    let mut list = Vec::new();
    for (i, e) in elts.into_iter().enumerate().take(max.min(n + 1)) {
        match e {
            Some(v) => list.push(v),
            None => return Err(KeyvalError(format!("Parameter '{path}{i}' missing"))),
        }
    }
    if max > n {
        return Err(KeyvalError(format!("Parameter '{path}{n}' missing")));
    }
    Ok(Value::Array(list))
}

/// Parse `KEY=VALUE,...` into a tree of strings, objects and lists. With
/// `implied_key`, the first item may be a bare value for that key.
pub fn parse(params: &str, implied_key: Option<&str>) -> Result<Map<String, Value>, KeyvalError> {
    let mut root = Map::new();
    let mut s = params;
    let mut implied = implied_key;
    while !s.is_empty() {
        s = parse_one(&mut root, s, implied)?;
        implied = None;
    }
    match listify(root, "")? {
        Value::Object(m) => Ok(m),
        _ => Err(KeyvalError("Parameters '*' used inconsistently".into())),
    }
}

/// Parse a command-line option argument for type `T`: JSON if it starts
/// with `{`, key=value otherwise; then check and convert it against `T`'s
/// schema. The error text is what qemu-storage-daemon prints after
/// "--option ARG: ".
pub fn parse_option<T: SchemaType + DeserializeOwned>(
    arg: &str,
    implied_key: Option<&str>,
) -> Result<T, KeyvalError> {
    if arg.starts_with('{') {
        let v = parse_str(arg).map_err(|e| KeyvalError(e.to_string()))?;
        return parse_as(v, InputMode::Json).map_err(KeyvalError);
    }
    let m = parse(arg, implied_key)?;
    parse_as(Value::Object(m), InputMode::Keyval).map_err(KeyvalError)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::schema::SchemaType;
    use serde_json::json;

    fn p(s: &str, ik: Option<&str>) -> Result<Value, String> {
        parse(s, ik).map(Value::Object).map_err(|e| e.0)
    }

    #[test]
    fn syntax() {
        assert_eq!(
            p(
                "driver=raw,file.driver=file,file.filename=/a,,b",
                Some("driver")
            )
            .unwrap(),
            json!({"driver": "raw", "file": {"driver": "file", "filename": "/a,b"}})
        );
        assert_eq!(
            p("socket,id=m,path=/x", Some("backend")).unwrap(),
            json!({"backend": "socket", "id": "m", "path": "/x"})
        );
        assert_eq!(
            p("x.0=a,x.1=b,y.0.z=1", None).unwrap(),
            json!({"x": ["a", "b"], "y": [{"z": "1"}]})
        );
        assert_eq!(p("a=1,a=2", None).unwrap(), json!({"a": "2"}));
        assert_eq!(p("a=", None).unwrap(), json!({"a": ""}));
        assert_eq!(p("a=1,", None).unwrap(), json!({"a": "1"}));
    }

    /// Texts taken from qemu-storage-daemon 10.0 (`--blockdev ARG`).
    #[test]
    fn qemu_errors() {
        let b = Some("driver");
        assert_eq!(p("=x", b).unwrap_err(), "Invalid parameter ''");
        assert_eq!(p(",driver=null-co", b).unwrap_err(), "Invalid parameter ''");
        assert_eq!(p("a..b=1", b).unwrap_err(), "Invalid parameter 'a..b'");
        assert_eq!(p(".a=1", b).unwrap_err(), "Invalid parameter '.a'");
        assert_eq!(p("a.=1", b).unwrap_err(), "Invalid parameter 'a.'");
        assert_eq!(
            p("driver=null-co,x.0=1,x.2=2", b).unwrap_err(),
            "Parameter 'x.1' missing"
        );
        assert_eq!(
            p("driver=null-co,x.0=1,x.a=2", b).unwrap_err(),
            "Parameters 'x.*' used inconsistently"
        );
        assert_eq!(
            p("driver=qcow2,file.x=1,file=y", b).unwrap_err(),
            "Parameters 'file.*' used inconsistently"
        );
        assert_eq!(
            p("file=x,file.driver=null-co", b).unwrap_err(),
            "Parameters 'file.*' used inconsistently"
        );
        assert_eq!(
            p("x=2,x.y=1", b).unwrap_err(),
            "Parameters 'x.*' used inconsistently"
        );
        assert_eq!(
            p("a,b", None).unwrap_err(),
            "Expected '=' after parameter 'a'"
        );
        let long = "b".repeat(130);
        assert_eq!(
            p(&format!("driver=null-co,{long}=1"), b).unwrap_err(),
            format!("Parameter '{long}' is too long")
        );
        assert_eq!(p("driver", b).unwrap(), json!({"driver": "driver"}));
        assert_eq!(
            p("driver=null-co,,x=1", b).unwrap(),
            json!({"driver": "null-co,x=1"})
        );
    }

    crate::qmp_struct! {
        /// null-co-like options for tests.
        pub struct NullOpts("BlockdevOptionsNull") {
            /// Driver.
            "driver" => pub driver: String,
            /// Node name.
            "node-name" => pub node_name: Option<String>,
            /// Size.
            "size" => pub size: Option<i64>,
            /// Read zeroes.
            "read-zeroes" => pub read_zeroes: Option<bool>,
        }
    }

    #[test]
    fn typed_options() {
        let o: NullOpts = parse_option(
            "null-co,node-name=a,size=0x10,read-zeroes=yes",
            Some("driver"),
        )
        .unwrap();
        assert_eq!(o.size, Some(16));
        assert_eq!(o.read_zeroes, Some(true));
        let j: NullOpts = parse_option(r#"{"driver":"null-co","size":5}"#, Some("driver")).unwrap();
        assert_eq!(j.size, Some(5));
        // Texts taken from qemu-storage-daemon 10.0.
        let e = |s: &str| parse_option::<NullOpts>(s, Some("driver")).unwrap_err().0;
        assert_eq!(
            e("driver=null-co,size=1k"),
            "Parameter 'size' expects integer"
        );
        assert_eq!(
            e("driver=null-co,size=99999999999999999999"),
            "Parameter 'size' expects integer"
        );
        assert_eq!(
            e("driver=null-co,read-zeroes=1"),
            "Parameter 'read-zeroes' expects 'on' or 'off'"
        );
        assert_eq!(
            e("driver=null-co,bogus=1"),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(e("{bad"), "JSON parse error, invalid keyword 'bad'");
        assert_eq!(e("node-name=a"), "Parameter 'driver' is missing");
        let _ = NullOpts::describe();
    }
}
