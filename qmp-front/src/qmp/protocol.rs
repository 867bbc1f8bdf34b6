//! Transport-independent QMP monitor session, per QEMU's qmp-spec.
//!
//! A [`Session`] turns bytes from one client into [`Incoming`] items:
//! either a ready reply line (protocol errors: bad JSON, non-object input,
//! bad top-level members) or a validated [`Request`] for the dispatcher. It
//! tracks capability negotiation and formats replies and events exactly as
//! QEMU 10 does (member order, spacing, pretty mode, `\r\n` line ends).
//! It lives on the monitor's loop thread and does no I/O.

use serde_json::{json, Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

use super::json_out::{qdict_order, to_json};
use super::json_stream::{JsonStream, StreamItem};

/// QMP error classes (QEMU's `QapiErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QmpErrorClass {
    /// Any error without a more specific class.
    GenericError,
    /// The command does not exist or is not available now.
    CommandNotFound,
    /// A device was not found.
    DeviceNotFound,
    /// A device exists but is not active.
    DeviceNotActive,
    /// The requested KVM capability is missing.
    KVMMissingCap,
}

impl QmpErrorClass {
    /// The class name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            QmpErrorClass::GenericError => "GenericError",
            QmpErrorClass::CommandNotFound => "CommandNotFound",
            QmpErrorClass::DeviceNotFound => "DeviceNotFound",
            QmpErrorClass::DeviceNotActive => "DeviceNotActive",
            QmpErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// An error answered to a QMP client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// Error class.
    pub class: QmpErrorClass,
    /// Human-readable description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: QmpErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// An error of the given class.
    pub fn new(class: QmpErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }
}

/// What a session announces in its greeting and `query-version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// `(major, minor, micro)`.
    pub version: (u64, u64, u64),
    /// The `package` string.
    pub package: String,
    /// Pretty-print output (`--monitor ...,pretty=on`).
    pub pretty: bool,
    /// Offer the `oob` capability.
    pub oob: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            version: (10, 0, 2),
            package: String::new(),
            pretty: false,
            oob: true,
        }
    }
}

/// Capability-negotiation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only `qmp_capabilities` is accepted; no events are sent.
    Negotiation,
    /// Normal operation.
    Command,
}

/// A syntactically valid request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Command name (`execute` or `exec-oob`).
    pub command: String,
    /// Arguments (empty if absent).
    pub arguments: Map<String, Value>,
    /// The `id` to echo, any JSON value.
    pub id: Option<Value>,
    /// Sent with `exec-oob`.
    pub oob: bool,
}

/// One result of feeding bytes to a session.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A reply line to send as is (a protocol-level error).
    Reply(String),
    /// A request for the dispatcher.
    Request(Request),
}

/// Event timestamp (seconds and microseconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    /// Seconds.
    pub seconds: i64,
    /// Microseconds.
    pub microseconds: i64,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: d.as_secs() as i64,
            microseconds: i64::from(d.subsec_micros()),
        }
    }
}

/// One client's QMP session.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    mode: Mode,
    oob_enabled: bool,
    stream: JsonStream,
}

impl Session {
    /// A session in negotiation mode.
    pub fn new(cfg: SessionConfig) -> Self {
        Session {
            cfg,
            mode: Mode::Negotiation,
            oob_enabled: false,
            stream: JsonStream::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether `oob` was enabled by `qmp_capabilities`.
    pub fn oob_enabled(&self) -> bool {
        self.oob_enabled
    }

    /// Leave negotiation mode (done by the `qmp_capabilities` command).
    pub fn enter_command_mode(&mut self, oob: bool) {
        self.mode = Mode::Command;
        self.oob_enabled = oob;
    }

    /// `query-version`'s return value.
    pub fn version_info(&self) -> Value {
        let (major, minor, micro) = self.cfg.version;
        json!({"qemu": {"major": major, "minor": minor, "micro": micro}, "package": self.cfg.package})
    }

    /// The greeting line.
    pub fn greeting(&self) -> String {
        let caps: Vec<&str> = if self.cfg.oob { vec!["oob"] } else { vec![] };
        self.line(&json!({"QMP": {"version": self.version_info(), "capabilities": caps}}))
    }

    /// Format one output line as QEMU's monitor does: every `\n` becomes `\r\n`.
    pub fn line(&self, v: &Value) -> String {
        let mut s = to_json(v, self.cfg.pretty);
        s.push('\n');
        s.replace('\n', "\r\n")
    }

    /// A success reply line.
    pub fn success(&self, ret: Value, id: Option<&Value>) -> String {
        let mut m = Map::new();
        m.insert("return".into(), ret);
        if let Some(id) = id {
            m.insert("id".into(), id.clone());
        }
        self.line(&Value::Object(m))
    }

    /// An error reply line.
    pub fn error(&self, err: &QmpError, id: Option<&Value>) -> String {
        let mut m = Map::new();
        m.insert(
            "error".into(),
            json!({"class": err.class.as_str(), "desc": err.desc}),
        );
        if let Some(id) = id {
            m.insert("id".into(), id.clone());
        }
        self.line(&Value::Object(m))
    }

    /// An event line, or `None` while negotiating (QEMU sends no events then).
    pub fn event(&self, name: &str, data: Option<Value>, ts: Timestamp) -> Option<String> {
        if self.mode == Mode::Negotiation {
            return None;
        }
        let mut m = Map::new();
        m.insert(
            "timestamp".into(),
            json!({"seconds": ts.seconds, "microseconds": ts.microseconds}),
        );
        m.insert("event".into(), name.into());
        if let Some(d) = data {
            m.insert("data".into(), d);
        }
        Some(self.line(&Value::Object(m)))
    }

    /// Feed bytes received from the client.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Incoming> {
        let items = self.stream.feed(bytes);
        items.into_iter().map(|i| self.classify(i)).collect()
    }

    /// The client closed its side: flush the reader.
    pub fn finish(&mut self) -> Vec<Incoming> {
        let items = self.stream.finish();
        items.into_iter().map(|i| self.classify(i)).collect()
    }

    fn classify(&self, item: StreamItem) -> Incoming {
        match item {
            StreamItem::Error(e) => {
                Incoming::Reply(self.error(&QmpError::generic(e.to_string()), None))
            }
            StreamItem::Value(v) => match self.check_request(v) {
                Ok(r) => Incoming::Request(r),
                Err((e, id)) => Incoming::Reply(self.error(&e, id.as_ref())),
            },
        }
    }

    /// QEMU's `qmp_dispatch_check_obj`.
    fn check_request(&self, v: Value) -> Result<Request, (QmpError, Option<Value>)> {
        let Value::Object(mut m) = v else {
            return Err((QmpError::generic("QMP input must be a JSON object"), None));
        };
        let id = m.get("id").cloned();
        let fail = |d: String| Err((QmpError::generic(d), id.clone()));
        for k in qdict_order(&m) {
            let val = &m[k];
            match k.as_str() {
                "execute" | "exec-oob" => {
                    if k == "exec-oob" && !self.oob_enabled {
                        return fail(format!("QMP input member '{k}' is unexpected"));
                    }
                    if !val.is_string() {
                        return fail(format!("QMP input member '{k}' must be a string"));
                    }
                }
                "arguments" => {
                    if !val.is_object() {
                        return fail("QMP input member 'arguments' must be an object".into());
                    }
                }
                "id" => {}
                _ => return fail(format!("QMP input member '{k}' is unexpected")),
            }
        }
        let exec = m.remove("execute");
        let oob = m.remove("exec-oob");
        let (command, is_oob) = match (exec, oob) {
            (Some(Value::String(c)), None) => (c, false),
            (None, Some(Value::String(c))) => (c, true),
            (None, None) => return fail("QMP input lacks member 'execute'".into()),
            _ => return fail("QMP input must have either 'execute' or 'exec-oob'".into()),
        };
        let arguments = match m.remove("arguments") {
            Some(Value::Object(a)) => a,
            _ => Map::new(),
        };
        Ok(Request {
            command,
            arguments,
            id,
            oob: is_oob,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qsd() -> Session {
        Session::new(SessionConfig {
            version: (10, 0, 2),
            package: "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1".into(),
            pretty: false,
            oob: true,
        })
    }

    fn reply(s: &mut Session, input: &str) -> String {
        match s.feed(input.as_bytes()).as_slice() {
            [Incoming::Reply(r)] => r.clone(),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Byte-exact lines taken from qemu-storage-daemon 10.0.
    #[test]
    fn greeting_matches_qemu() {
        assert_eq!(
            qsd().greeting(),
            "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1\"}, \"capabilities\": [\"oob\"]}}\r\n"
        );
        let mut cfg = qsd().config().clone();
        cfg.pretty = true;
        assert_eq!(
            Session::new(cfg).greeting(),
            "{\r\n    \"QMP\": {\r\n        \"version\": {\r\n            \"qemu\": {\r\n                \"micro\": 2,\r\n                \"minor\": 0,\r\n                \"major\": 10\r\n            },\r\n            \"package\": \"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1\"\r\n        },\r\n        \"capabilities\": [\r\n            \"oob\"\r\n        ]\r\n    }\r\n}\r\n"
        );
    }

    /// Expected replies taken from qemu-storage-daemon 10.0.
    #[test]
    fn request_errors_match_qemu() {
        let mut s = qsd();
        let g = |d: &str| {
            format!("{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"{d}\"}}}}\r\n")
        };
        assert_eq!(reply(&mut s, "[1]"), g("QMP input must be a JSON object"));
        assert_eq!(reply(&mut s, "{}"), g("QMP input lacks member 'execute'"));
        assert_eq!(
            reply(&mut s, "{\"foo\":1}"),
            g("QMP input member 'foo' is unexpected")
        );
        assert_eq!(
            reply(&mut s, "{\"execute\":1}"),
            g("QMP input member 'execute' must be a string")
        );
        assert_eq!(
            reply(&mut s, "{\"execute\":\"q\",\"arguments\":[]}"),
            g("QMP input member 'arguments' must be an object")
        );
        assert_eq!(
            reply(&mut s, "{\"exec-oob\":\"q\"}"),
            g("QMP input member 'exec-oob' is unexpected")
        );
        assert_eq!(
            reply(&mut s, "{\"execute\":\"q\",\"id\":1,\"arguments\":{\"a\":1},\"b\":2}"),
            "{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'b' is unexpected\"}}\r\n"
        );
        assert_eq!(
            reply(&mut s, "{\"arguments\":{},\"id\":1}"),
            "{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input lacks member 'execute'\"}}\r\n"
        );
        assert_eq!(
            reply(&mut s, "garbage\n"),
            g("JSON parse error, invalid keyword 'garbage'")
        );
    }

    #[test]
    fn requests_and_events() {
        let mut s = qsd();
        let got = s.feed(b"{\"execute\":\"x\",\"id\":[1,{\"a\":2}],\"arguments\":{\"k\":true}}");
        assert_eq!(
            got,
            vec![Incoming::Request(Request {
                command: "x".into(),
                arguments: serde_json::from_str("{\"k\":true}").unwrap(),
                id: Some(json!([1, {"a": 2}])),
                oob: false,
            })]
        );
        let ts = Timestamp {
            seconds: 1,
            microseconds: 2,
        };
        assert_eq!(s.event("E", None, ts), None);
        s.enter_command_mode(false);
        assert_eq!(
            s.event("JOB_STATUS_CHANGE", Some(json!({"status": "created", "id": "j"})), ts).unwrap(),
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"status\": \"created\", \"id\": \"j\"}}\r\n"
        );
        assert_eq!(
            s.success(json!({}), Some(&json!([1, {"a": 2}]))),
            "{\"return\": {}, \"id\": [1, {\"a\": 2}]}\r\n"
        );
        assert_eq!(
            s.error(&QmpError::new(QmpErrorClass::CommandNotFound, "The command nope has not been found"), Some(&json!("x"))),
            "{\"id\": \"x\", \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\r\n"
        );
    }
}
