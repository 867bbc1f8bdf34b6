//! The typed command schema: one description per type, from which strict
//! argument parsing (JSON and key=value input), `query-qmp-schema`
//! introspection and `query-commands` are all derived.
//!
//! A type describes itself through [`SchemaType`]; the [`qmp_struct!`] and
//! [`qmp_enum!`] macros declare a Rust type, its serde mapping and its
//! description in one place. Descriptions are built on demand and refer to
//! member types through function pointers, so recursive types are fine.
//! Nothing here holds mutable state.
//!
//! Parsing is two-step: [`coerce`] checks a `serde_json::Value` against the
//! description with QEMU 10's error texts (and, in keyval mode, converts
//! strings to the expected scalar types), then serde builds the Rust value.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::collections::HashMap;

use super::json_out::qdict_order;

/// Integer widths QAPI distinguishes (all introspect as `int`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntKind {
    /// `int8`
    I8,
    /// `int16`
    I16,
    /// `int32`
    I32,
    /// `int` / `int64`
    I64,
    /// `uint8`
    U8,
    /// `uint16`
    U16,
    /// `uint32`
    U32,
    /// `uint64`
    U64,
    /// `size` (keyval accepts suffixes such as `1G`)
    Size,
}

/// QAPI built-in types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// `str`
    Str,
    /// Any integer type.
    Int(IntKind),
    /// `bool`
    Bool,
    /// `number` (double)
    Number,
    /// `any`
    Any,
    /// `null`
    Null,
}

/// Lazily built description of a type (lets recursive types refer to each other).
pub type DescFn = fn() -> TypeDesc;

/// A member of an object type.
#[derive(Debug, Clone)]
pub struct Member {
    /// Wire name.
    pub name: &'static str,
    /// Member type.
    pub ty: fn() -> TypeDesc,
    /// Whether the member may be absent.
    pub optional: bool,
}

/// A flat union's discriminator and variants.
#[derive(Debug, Clone)]
pub struct Union {
    /// Name of the (enum-typed) base member selecting the variant.
    pub tag: &'static str,
    /// `(tag value, object type with the variant's extra members)`.
    pub variants: Vec<(&'static str, DescFn)>,
}

/// Description of a QAPI type.
#[derive(Debug, Clone)]
pub enum TypeDesc {
    /// A built-in scalar.
    Builtin(Builtin),
    /// An enumeration.
    Enum {
        /// QAPI type name.
        name: &'static str,
        /// Wire values in declaration order.
        values: &'static [&'static str],
    },
    /// A struct, optionally a flat union.
    Object {
        /// QAPI type name (`q_obj_<cmd>-arg` for implicit argument types).
        name: &'static str,
        /// Members in declaration order (base members for a union).
        members: Vec<Member>,
        /// Union variants, if any.
        union: Option<Union>,
    },
    /// A list of the element type.
    Array(fn() -> TypeDesc),
    /// An alternate: one of several types, chosen by JSON type.
    Alternate {
        /// QAPI type name.
        name: &'static str,
        /// The alternatives.
        members: Vec<fn() -> TypeDesc>,
    },
}

/// A Rust type with a QAPI description.
pub trait SchemaType {
    /// Whether a member of this type may be absent (true for `Option`).
    const OPTIONAL: bool = false;
    /// The type's description.
    fn describe() -> TypeDesc;
    /// Whether this value is absent (serialisation skips it).
    fn is_absent(&self) -> bool {
        false
    }
}

macro_rules! builtin {
    ($($t:ty => $b:expr),* $(,)?) => {
        $(impl SchemaType for $t {
            fn describe() -> TypeDesc {
                TypeDesc::Builtin($b)
            }
        })*
    };
}

builtin! {
    String => Builtin::Str,
    bool => Builtin::Bool,
    f64 => Builtin::Number,
    i8 => Builtin::Int(IntKind::I8),
    i16 => Builtin::Int(IntKind::I16),
    i32 => Builtin::Int(IntKind::I32),
    i64 => Builtin::Int(IntKind::I64),
    u8 => Builtin::Int(IntKind::U8),
    u16 => Builtin::Int(IntKind::U16),
    u32 => Builtin::Int(IntKind::U32),
    u64 => Builtin::Int(IntKind::U64),
    Value => Builtin::Any,
    Size => Builtin::Int(IntKind::Size),
}

/// QAPI `size`: a byte count (keyval input accepts `k`, `M`, `G`... suffixes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Size(pub u64);

/// The empty object (`q_empty`): arguments of argument-less commands and
/// the return value of commands that return nothing (`{}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

impl SchemaType for Empty {
    fn describe() -> TypeDesc {
        TypeDesc::Object {
            name: "q_empty",
            members: Vec::new(),
            union: None,
        }
    }
}

impl<T: SchemaType> SchemaType for Option<T> {
    const OPTIONAL: bool = true;
    fn describe() -> TypeDesc {
        T::describe()
    }
    fn is_absent(&self) -> bool {
        self.is_none()
    }
}

impl<T: SchemaType> SchemaType for Vec<T> {
    fn describe() -> TypeDesc {
        TypeDesc::Array(T::describe)
    }
}

/// Declare a QAPI struct: the Rust struct, its serde mapping and its
/// [`SchemaType`] description. `SchemaType` must be in scope at the use site.
///
/// ```ignore
/// qmp_struct! {
///     /// Arguments of block-dirty-bitmap-add.
///     pub struct BitmapAdd("q_obj_block-dirty-bitmap-add-arg") {
///         /// Node name.
///         "node" => pub node: String,
///         /// Granularity.
///         "granularity" => pub granularity: Option<u32>,
///     }
/// }
/// ```
#[macro_export]
macro_rules! qmp_struct {
    (
        $(#[$m:meta])*
        $vis:vis struct $name:ident ($qname:literal) {
            $( $(#[$fm:meta])* $wire:literal => $fvis:vis $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
        $vis struct $name {
            $(
                $(#[$fm])*
                #[serde(rename = $wire, skip_serializing_if = "SchemaType::is_absent")]
                $fvis $field: $ty,
            )*
        }

        impl $crate::qmp::schema::SchemaType for $name {
            fn describe() -> $crate::qmp::schema::TypeDesc {
                $crate::qmp::schema::TypeDesc::Object {
                    name: $qname,
                    members: vec![$(
                        $crate::qmp::schema::Member {
                            name: $wire,
                            ty: <$ty as $crate::qmp::schema::SchemaType>::describe,
                            optional: <$ty as $crate::qmp::schema::SchemaType>::OPTIONAL,
                        }
                    ),*],
                    union: None,
                }
            }
        }
    };
}

/// Declare a QAPI enum: the Rust enum, its serde mapping and its description.
#[macro_export]
macro_rules! qmp_enum {
    (
        $(#[$m:meta])*
        $vis:vis enum $name:ident ($qname:literal) {
            $( $(#[$vm:meta])* $variant:ident = $wire:literal ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        $vis enum $name {
            $( $(#[$vm])* #[serde(rename = $wire)] $variant, )*
        }

        impl $crate::qmp::schema::SchemaType for $name {
            fn describe() -> $crate::qmp::schema::TypeDesc {
                $crate::qmp::schema::TypeDesc::Enum { name: $qname, values: &[$($wire),*] }
            }
        }
    };
}

/// How scalars are presented to [`coerce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputMode {
    /// JSON (QMP, `--blockdev '{...}'`): scalars must have their JSON type.
    Json,
    /// Key=value: scalars are strings, converted to the expected type.
    Keyval,
}

#[derive(Debug, Clone)]
enum Seg {
    Name(String),
    Index(usize),
}

/// Position inside the value being checked, for QEMU's error names.
#[derive(Debug, Clone, Default)]
struct Path(Vec<Seg>);

impl Path {
    fn push(&self, s: Seg) -> Path {
        let mut p = self.clone();
        p.0.push(s);
        p
    }

    /// QEMU's `full_name()`: `a.b`, `bitmaps[0].name`.
    fn full(&self) -> String {
        let mut s = String::new();
        for seg in &self.0 {
            match seg {
                Seg::Name(n) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(n);
                }
                Seg::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        if s.is_empty() {
            s.push_str("null");
        }
        s
    }

    /// The visitor's plain `name` (`null` for list elements).
    fn plain(&self) -> String {
        match self.0.last() {
            Some(Seg::Name(n)) => n.clone(),
            _ => "null".into(),
        }
    }
}

fn bad_type(p: &Path, expected: &str) -> String {
    format!(
        "Invalid parameter type for '{}', expected: {}",
        p.full(),
        expected
    )
}

fn bad_value(name: &str, expected: &str) -> String {
    format!("Parameter '{name}' expects {expected}")
}

/// Check `v` against `desc`; returns the value normalised for serde (and
/// converted from strings in keyval mode). Errors carry QEMU's text.
pub fn coerce(v: Value, desc: &TypeDesc, mode: InputMode) -> Result<Value, String> {
    coerce_at(v, desc, mode, &Path::default())
}

/// Check `v` against `T`'s description and build a `T`.
pub fn parse_as<T: SchemaType + DeserializeOwned>(v: Value, mode: InputMode) -> Result<T, String> {
    let v = coerce(v, &T::describe(), mode)?;
    serde_json::from_value(v).map_err(|e| e.to_string())
}

fn parse_c_int(s: &str) -> Option<i128> {
    let t = s.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() {
        return None;
    }
    let v = i128::from_str_radix(digits, radix).ok()?;
    Some(if neg { -v } else { v })
}

fn parse_size(s: &str) -> Option<u64> {
    let idx = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(idx);
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
        let f: f64 = num.parse().ok()?;
        let r = f * mult as f64;
        (r.is_finite() && r < 18446744073709551616.0 && mult > 1).then_some(r as u64)
    } else {
        let n = parse_c_int(num)?;
        u64::try_from(n).ok()?.checked_mul(mult)
    }
}

fn int_range(k: IntKind) -> (i128, i128, &'static str) {
    match k {
        IntKind::I8 => (i8::MIN.into(), i8::MAX.into(), "int8_t"),
        IntKind::I16 => (i16::MIN.into(), i16::MAX.into(), "int16_t"),
        IntKind::I32 => (i32::MIN.into(), i32::MAX.into(), "int32_t"),
        IntKind::I64 => (i64::MIN.into(), i64::MAX.into(), "int64_t"),
        IntKind::U8 => (0, u8::MAX.into(), "uint8_t"),
        IntKind::U16 => (0, u16::MAX.into(), "uint16_t"),
        IntKind::U32 => (0, u32::MAX.into(), "uint32_t"),
        IntKind::U64 | IntKind::Size => (0, u64::MAX.into(), "uint64_t"),
    }
}

fn coerce_int(v: Value, k: IntKind, mode: InputMode, p: &Path) -> Result<Value, String> {
    let unsigned = matches!(
        k,
        IntKind::U8 | IntKind::U16 | IntKind::U32 | IntKind::U64 | IntKind::Size
    );
    let n: i128 = match (mode, &v) {
        (InputMode::Json, Value::Number(n)) if n.as_i64().is_some() || n.as_u64().is_some() => {
            match (n.as_i64(), n.as_u64()) {
                // uint64 accepts negative values for backward compatibility.
                (Some(i), _) if unsigned => i128::from(i as u64),
                (Some(i), _) => i128::from(i),
                (None, Some(u)) if unsigned => i128::from(u),
                _ => return Err(bad_type(p, "integer")),
            }
        }
        (InputMode::Json, _) if unsigned => return Err(bad_value(&p.full(), "uint64")),
        (InputMode::Json, _) => return Err(bad_type(p, "integer")),
        (InputMode::Keyval, Value::String(s)) if k == IntKind::Size => match parse_size(s) {
            Some(n) => i128::from(n),
            None => return Err(bad_value(&p.full(), "size")),
        },
        (InputMode::Keyval, Value::String(s)) => {
            let parsed = parse_c_int(s).filter(|n| {
                if unsigned {
                    // strtoull: negative values wrap.
                    (-i128::from(u64::MAX)..=i128::from(u64::MAX)).contains(n)
                } else {
                    (i128::from(i64::MIN)..=i128::from(i64::MAX)).contains(n)
                }
            });
            match parsed {
                Some(n) if unsigned && n < 0 => i128::from(u64::MAX) + 1 + n,
                Some(n) => n,
                None => return Err(bad_value(&p.full(), "integer")),
            }
        }
        (InputMode::Keyval, _) => return Err(bad_type(p, "integer")),
    };
    let (min, max, cname) = int_range(k);
    if n < min || n > max {
        return Err(bad_value(&p.plain(), cname));
    }
    Ok(if unsigned {
        Value::from(n as u64)
    } else {
        Value::from(n as i64)
    })
}

fn coerce_at(v: Value, desc: &TypeDesc, mode: InputMode, p: &Path) -> Result<Value, String> {
    match desc {
        TypeDesc::Builtin(b) => match (b, mode, v) {
            (Builtin::Any, _, v) => Ok(v),
            (Builtin::Int(k), _, v) => coerce_int(v, *k, mode, p),
            (Builtin::Str, _, v @ Value::String(_)) => Ok(v),
            (Builtin::Str, _, _) => Err(bad_type(p, "string")),
            (Builtin::Bool, InputMode::Json, v @ Value::Bool(_)) => Ok(v),
            (Builtin::Bool, InputMode::Keyval, Value::String(s)) => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Value::Bool(true)),
                "off" | "no" | "false" | "n" => Ok(Value::Bool(false)),
                _ => Err(bad_value(&p.full(), "'on' or 'off'")),
            },
            (Builtin::Bool, _, _) => Err(bad_type(p, "boolean")),
            (Builtin::Number, InputMode::Json, v @ Value::Number(_)) => Ok(v),
            (Builtin::Number, InputMode::Keyval, Value::String(s)) => s
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| bad_value(&p.full(), "number")),
            (Builtin::Number, _, _) => Err(bad_type(p, "number")),
            (Builtin::Null, InputMode::Json, Value::Null) => Ok(Value::Null),
            (Builtin::Null, InputMode::Keyval, Value::String(s)) if s.is_empty() => Ok(Value::Null),
            (Builtin::Null, InputMode::Keyval, Value::String(_)) => {
                Err(bad_value(&p.full(), "null"))
            }
            (Builtin::Null, _, _) => Err(bad_type(p, "null")),
        },
        TypeDesc::Enum { values, .. } => match v {
            Value::String(s) if values.contains(&s.as_str()) => Ok(Value::String(s)),
            Value::String(s) => Err(format!(
                "Parameter '{}' does not accept value '{}'",
                p.plain(),
                s
            )),
            _ => Err(bad_type(p, "string")),
        },
        TypeDesc::Array(el) => match v {
            Value::Array(items) => {
                let el = el();
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    out.push(coerce_at(item, &el, mode, &p.push(Seg::Index(i)))?);
                }
                Ok(Value::Array(out))
            }
            _ => Err(bad_type(p, "array")),
        },
        TypeDesc::Alternate { name, members } => {
            for m in members {
                let d = m();
                let fits = match (&d, &v) {
                    (TypeDesc::Builtin(Builtin::Str), Value::String(_))
                    | (TypeDesc::Enum { .. }, Value::String(_))
                    | (TypeDesc::Builtin(Builtin::Bool), Value::Bool(_))
                    | (TypeDesc::Builtin(Builtin::Int(_)), Value::Number(_))
                    | (TypeDesc::Builtin(Builtin::Number), Value::Number(_))
                    | (TypeDesc::Builtin(Builtin::Null), Value::Null)
                    | (TypeDesc::Object { .. }, Value::Object(_))
                    | (TypeDesc::Array(_), Value::Array(_)) => true,
                    // Keyval: every scalar is a string; QEMU prefers the string branch.
                    (TypeDesc::Builtin(_), Value::String(_)) => mode == InputMode::Keyval,
                    _ => false,
                };
                if fits {
                    return coerce_at(v, &d, mode, p);
                }
            }
            Err(format!(
                "Invalid parameter type for '{}', expected: {}",
                p.plain(),
                name
            ))
        }
        TypeDesc::Object { members, union, .. } => {
            let Value::Object(mut map) = v else {
                return Err(bad_type(p, "object"));
            };
            let mut out = Map::new();
            coerce_members(&mut map, &mut out, members, mode, p)?;
            if let Some(u) = union {
                let tag = out
                    .get(u.tag)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if let Some((_, vt)) = u.variants.iter().find(|(c, _)| *c == tag) {
                    if let TypeDesc::Object { members, .. } = vt() {
                        coerce_members(&mut map, &mut out, &members, mode, p)?;
                    }
                }
            }
            if let Some(k) = qdict_order(&map).first() {
                return Err(format!(
                    "Parameter '{}' is unexpected",
                    p.push(Seg::Name(k.to_string())).full()
                ));
            }
            Ok(Value::Object(out))
        }
    }
}

fn coerce_members(
    map: &mut Map<String, Value>,
    out: &mut Map<String, Value>,
    members: &[Member],
    mode: InputMode,
    p: &Path,
) -> Result<(), String> {
    for m in members {
        let mp = p.push(Seg::Name(m.name.to_string()));
        match map.remove(m.name) {
            Some(val) => {
                out.insert(m.name.to_string(), coerce_at(val, &(m.ty)(), mode, &mp)?);
            }
            None if m.optional => {}
            None => return Err(format!("Parameter '{}' is missing", mp.full())),
        }
    }
    Ok(())
}

/// Builds `query-qmp-schema` output the way QEMU's introspection generator
/// does: commands and events first (in registration order), then every type
/// they reach in order of first use; non-builtin type names are masked as
/// "0", "1", ...; array names are `[<element>]`; all integer types are `int`.
#[derive(Default)]
pub struct Introspector {
    names: HashMap<String, String>,
    used: Vec<(String, TypeDesc)>,
    used_keys: HashMap<String, ()>,
    entries: Vec<Value>,
}

/// Introspection properties of a command.
#[derive(Debug, Clone, Default)]
pub struct CommandMeta {
    /// May be executed out of band.
    pub allow_oob: bool,
    /// Feature flags such as `deprecated`, `unstable`.
    pub features: Vec<&'static str>,
}

fn builtin_name(b: Builtin) -> (&'static str, &'static str) {
    match b {
        Builtin::Str => ("str", "string"),
        Builtin::Int(_) => ("int", "int"),
        Builtin::Bool => ("bool", "boolean"),
        Builtin::Number => ("number", "number"),
        Builtin::Any => ("any", "value"),
        Builtin::Null => ("null", "null"),
    }
}

fn type_key(d: &TypeDesc) -> String {
    match d {
        TypeDesc::Builtin(b) => builtin_name(*b).0.to_string(),
        TypeDesc::Enum { name, .. }
        | TypeDesc::Object { name, .. }
        | TypeDesc::Alternate { name, .. } => name.to_string(),
        TypeDesc::Array(el) => format!("{}List", type_key(&el())),
    }
}

impl Introspector {
    /// A fresh introspector.
    pub fn new() -> Self {
        Self::default()
    }

    fn use_type(&mut self, d: TypeDesc) -> String {
        let key = type_key(&d);
        if !self.used_keys.contains_key(&key) {
            self.used_keys.insert(key.clone(), ());
            self.used.push((key.clone(), d.clone()));
        }
        match d {
            TypeDesc::Builtin(b) => builtin_name(b).0.to_string(),
            TypeDesc::Array(el) => format!("[{}]", self.use_type(el())),
            _ => {
                let n = self.names.len();
                self.names
                    .entry(key)
                    .or_insert_with(|| n.to_string())
                    .clone()
            }
        }
    }

    /// Add a command entry.
    pub fn command(&mut self, name: &str, args: TypeDesc, ret: TypeDesc, meta: &CommandMeta) {
        let arg = self.use_type(args);
        let ret = self.use_type(ret);
        let mut e = serde_json::json!({"name": name, "meta-type": "command", "arg-type": arg, "ret-type": ret});
        if meta.allow_oob {
            e["allow-oob"] = Value::Bool(true);
        }
        if !meta.features.is_empty() {
            e["features"] = meta.features.clone().into();
        }
        self.entries.push(e);
    }

    /// Add an event entry.
    pub fn event(&mut self, name: &str, data: TypeDesc) {
        let arg = self.use_type(data);
        self.entries
            .push(serde_json::json!({"name": name, "meta-type": "event", "arg-type": arg}));
    }

    /// Emit the types reached so far and return the whole list.
    pub fn finish(mut self) -> Vec<Value> {
        let mut i = 0;
        while i < self.used.len() {
            let (key, d) = self.used[i].clone();
            let e = match &d {
                TypeDesc::Builtin(b) => {
                    let (n, j) = builtin_name(*b);
                    serde_json::json!({"name": n, "meta-type": "builtin", "json-type": j})
                }
                TypeDesc::Array(el) => {
                    let et = self.use_type(el());
                    serde_json::json!({"name": format!("[{et}]"), "meta-type": "array", "element-type": et})
                }
                TypeDesc::Enum { values, .. } => {
                    let members: Vec<Value> = values
                        .iter()
                        .map(|v| serde_json::json!({"name": v}))
                        .collect();
                    serde_json::json!({"name": self.names[&key], "meta-type": "enum",
                        "members": members, "values": values})
                }
                TypeDesc::Alternate { members, .. } => {
                    let ms: Vec<Value> = members
                        .iter()
                        .map(|m| serde_json::json!({"type": self.use_type(m())}))
                        .collect();
                    serde_json::json!({"name": self.names[&key], "meta-type": "alternate", "members": ms})
                }
                TypeDesc::Object { members, union, .. } => {
                    let ms: Vec<Value> = members
                        .iter()
                        .map(|m| {
                            let mut o = serde_json::json!({"name": m.name, "type": self.use_type((m.ty)())});
                            if m.optional {
                                o["default"] = Value::Null;
                            }
                            o
                        })
                        .collect();
                    let mut o = serde_json::json!({"name": self.names[&key], "meta-type": "object", "members": ms});
                    if let Some(u) = union {
                        let vs: Vec<Value> = u
                            .variants
                            .iter()
                            .map(
                                |(c, t)| serde_json::json!({"case": c, "type": self.use_type(t())}),
                            )
                            .collect();
                        o["tag"] = u.tag.into();
                        o["variants"] = vs.into();
                    }
                    o
                }
            };
            self.entries.push(e);
            i += 1;
        }
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    qmp_struct! {
        /// Test struct modelled on block-dirty-bitmap-add.
        pub struct BitmapAdd("q_obj_block-dirty-bitmap-add-arg") {
            /// Node.
            "node" => pub node: String,
            /// Name.
            "name" => pub name: String,
            /// Granularity.
            "granularity" => pub granularity: Option<u32>,
            /// Persistent.
            "persistent" => pub persistent: Option<bool>,
        }
    }

    qmp_enum! {
        /// Test enum.
        pub enum Aio("BlockdevAioOptions") {
            /// threads
            Threads = "threads",
            /// native
            Native = "native",
        }
    }

    qmp_struct! {
        /// Nested test struct.
        pub struct Outer("Outer") {
            /// Cache.
            "cache" => pub cache: Option<Inner>,
            /// List.
            "bitmaps" => pub bitmaps: Option<Vec<Inner>>,
            /// Speed.
            "speed" => pub speed: Option<i64>,
            /// Size.
            "size" => pub size: Option<Size>,
            /// Aio.
            "aio" => pub aio: Option<Aio>,
        }
    }

    qmp_struct! {
        /// Inner test struct.
        pub struct Inner("Inner") {
            /// Direct.
            "direct" => pub direct: bool,
        }
    }

    fn e<T: SchemaType + DeserializeOwned + std::fmt::Debug>(v: Value) -> String {
        parse_as::<T>(v, InputMode::Json).unwrap_err()
    }

    #[test]
    fn parses_and_serialises() {
        let a: BitmapAdd = parse_as(
            json!({"node": "n", "name": "b", "granularity": 65536}),
            InputMode::Json,
        )
        .unwrap();
        assert_eq!(a.granularity, Some(65536));
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            json!({"node": "n", "name": "b", "granularity": 65536})
        );
    }

    /// Expected texts taken from qemu-storage-daemon 10.0.
    #[test]
    fn qemu_argument_errors() {
        assert_eq!(
            e::<BitmapAdd>(json!({"node": 1, "name": "b"})),
            "Invalid parameter type for 'node', expected: string"
        );
        assert_eq!(
            e::<BitmapAdd>(json!({"node": "n"})),
            "Parameter 'name' is missing"
        );
        assert_eq!(
            e::<BitmapAdd>(json!({"name": "b", "bad": 1})),
            "Parameter 'node' is missing"
        );
        assert_eq!(
            e::<BitmapAdd>(json!({"node": "n", "name": "b", "bad": 1, "bad2": 2})),
            "Parameter 'bad' is unexpected"
        );
        assert_eq!(
            e::<BitmapAdd>(json!({"node": "n", "name": "b", "granularity": "x"})),
            "Parameter 'granularity' expects uint64"
        );
        assert_eq!(
            e::<BitmapAdd>(json!({"node": "n", "name": "b", "granularity": 1.5})),
            "Parameter 'granularity' expects uint64"
        );
        assert_eq!(
            e::<BitmapAdd>(json!({"node": "n", "name": "b", "granularity": -1})),
            "Parameter 'granularity' expects uint32_t"
        );
        assert_eq!(
            e::<BitmapAdd>(json!({"node": "n", "name": "b", "granularity": 4294967296u64})),
            "Parameter 'granularity' expects uint32_t"
        );
        assert_eq!(
            e::<BitmapAdd>(json!({"node": "n", "name": "b", "persistent": null})),
            "Invalid parameter type for 'persistent', expected: boolean"
        );
        assert_eq!(
            e::<Outer>(json!({"speed": "a"})),
            "Invalid parameter type for 'speed', expected: integer"
        );
        assert_eq!(
            e::<Outer>(json!({"speed": u64::MAX})),
            "Invalid parameter type for 'speed', expected: integer"
        );
        assert_eq!(
            e::<Outer>(json!({"cache": 1})),
            "Invalid parameter type for 'cache', expected: object"
        );
        assert_eq!(
            e::<Outer>(json!({"cache": {"direct": "x"}})),
            "Invalid parameter type for 'cache.direct', expected: boolean"
        );
        assert_eq!(
            e::<Outer>(json!({"cache": {"direct": true, "zz": 1}})),
            "Parameter 'cache.zz' is unexpected"
        );
        assert_eq!(
            e::<Outer>(json!({"bitmaps": "x"})),
            "Invalid parameter type for 'bitmaps', expected: array"
        );
        assert_eq!(
            e::<Outer>(json!({"bitmaps": [{}]})),
            "Parameter 'bitmaps[0].direct' is missing"
        );
        assert_eq!(
            e::<Outer>(json!({"aio": "bad"})),
            "Parameter 'aio' does not accept value 'bad'"
        );
        assert_eq!(
            e::<Outer>(json!({"aio": 1})),
            "Invalid parameter type for 'aio', expected: string"
        );
        // uint64/size accept negative numbers for backward compatibility.
        let o: Outer = parse_as(json!({"size": -1}), InputMode::Json).unwrap();
        assert_eq!(o.size, Some(Size(u64::MAX)));
    }

    #[test]
    fn keyval_conversion() {
        let v = json!({"cache": {"direct": "on"}, "speed": "0x10", "size": "1k", "aio": "native"});
        let o: Outer = parse_as(v, InputMode::Keyval).unwrap();
        assert_eq!(o.speed, Some(16));
        assert_eq!(o.size, Some(Size(1024)));
        assert_eq!(o.cache, Some(Inner { direct: true }));
        assert_eq!(
            parse_as::<Outer>(json!({"speed": "1e3"}), InputMode::Keyval).unwrap_err(),
            "Parameter 'speed' expects integer"
        );
        assert_eq!(
            parse_as::<Outer>(json!({"cache": {"direct": "1"}}), InputMode::Keyval).unwrap_err(),
            "Parameter 'cache.direct' expects 'on' or 'off'"
        );
    }

    #[test]
    fn introspection_shape() {
        let mut i = Introspector::new();
        i.event("JOB_STATUS_CHANGE", BitmapAdd::describe());
        i.command(
            "x",
            Empty::describe(),
            Vec::<Inner>::describe(),
            &CommandMeta::default(),
        );
        let out = i.finish();
        assert_eq!(
            out[0],
            json!({"name": "JOB_STATUS_CHANGE", "meta-type": "event", "arg-type": "0"})
        );
        assert_eq!(
            out[1],
            json!({"name": "x", "meta-type": "command", "arg-type": "1", "ret-type": "[2]"})
        );
        assert_eq!(
            out[2],
            json!({"name": "0", "meta-type": "object", "members": [
                {"name": "node", "type": "str"}, {"name": "name", "type": "str"},
                {"name": "granularity", "type": "int", "default": null},
                {"name": "persistent", "type": "bool", "default": null}]})
        );
        assert_eq!(
            out[3],
            json!({"name": "1", "meta-type": "object", "members": []})
        );
        assert_eq!(
            out[4],
            json!({"name": "[2]", "meta-type": "array", "element-type": "2"})
        );
        assert_eq!(out[5]["name"], "2");
        let names: Vec<_> = out
            .iter()
            .map(|e| e["name"].as_str().unwrap_or("").to_string())
            .collect();
        assert!(names.contains(&"str".to_string()) && names.contains(&"bool".to_string()));
    }
}
