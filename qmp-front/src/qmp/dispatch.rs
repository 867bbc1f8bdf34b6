//! Command registry and dispatcher.
//!
//! Each command is registered once with its typed argument and return
//! structures ([`Registry::command`]); the registry derives argument
//! checking, `query-commands` and `query-qmp-schema` from them. Handlers are
//! async and run on the caller's single-threaded executor: their futures
//! need not be `Send`. Handlers get the daemon's context as `Rc<C>`.
//!
//! Built in: `qmp_capabilities` (negotiation), `query-version`,
//! `query-commands`, `query-qmp-schema`.
//!
//! A daemon loop, per connection:
//! ```ignore
//! out.write(session.greeting());
//! for item in session.feed(&bytes) {
//!     match item {
//!         Incoming::Reply(line) => out.write(line),
//!         Incoming::Request(req) => match registry.execute(&mut session, &ctx, req) {
//!             Execution::Ready(line) => out.write(line),
//!             Execution::Pending(fut) => spawn_local(async move { out.write(fut.await) }),
//!         },
//!     }
//! }
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use super::protocol::{Mode, QmpError, QmpErrorClass, Request, Session};
use super::schema::{
    coerce, CommandMeta, DescFn, Empty, InputMode, Introspector, SchemaType, TypeDesc,
};

/// A handler's result: the return value as JSON.
pub type HandlerResult = Result<Value, QmpError>;
/// A boxed, non-`Send` handler future.
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult>>>;
/// A future producing a formatted reply line.
pub type ReplyFuture = Pin<Box<dyn Future<Output = String>>>;

type Handler<C> = Rc<dyn Fn(Rc<C>, Value) -> Result<HandlerFuture, QmpError>>;

enum Kind<C> {
    Capabilities,
    QueryVersion,
    QueryCommands,
    QuerySchema,
    User(Handler<C>),
}

struct Entry<C> {
    name: &'static str,
    args: fn() -> TypeDesc,
    ret: fn() -> TypeDesc,
    meta: CommandMeta,
    kind: Kind<C>,
}

/// Result of [`Registry::execute`].
pub enum Execution {
    /// The reply is ready.
    Ready(String),
    /// The handler runs asynchronously; await for the reply line.
    Pending(ReplyFuture),
}

impl std::fmt::Debug for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Execution::Ready(s) => f.debug_tuple("Ready").field(s).finish(),
            Execution::Pending(_) => f.write_str("Pending(..)"),
        }
    }
}

/// The commands and events of a daemon, generic over its context `C`.
pub struct Registry<C> {
    commands: Vec<Entry<C>>,
    events: Vec<(&'static str, DescFn)>,
}

crate::qmp_enum! {
    /// QMP capabilities (`QMPCapability`).
    pub enum QmpCapability("QMPCapability") {
        /// Out-of-band execution.
        Oob = "oob",
    }
}

crate::qmp_struct! {
    /// Arguments of `qmp_capabilities`.
    pub struct QmpCapabilitiesArgs("q_obj_qmp_capabilities-arg") {
        /// Capabilities to enable.
        "enable" => pub enable: Option<Vec<QmpCapability>>,
    }
}

crate::qmp_struct! {
    /// `VersionTriple`.
    pub struct VersionTriple("VersionTriple") {
        /// Major.
        "major" => pub major: i64,
        /// Minor.
        "minor" => pub minor: i64,
        /// Micro.
        "micro" => pub micro: i64,
    }
}

crate::qmp_struct! {
    /// `VersionInfo`.
    pub struct VersionInfo("VersionInfo") {
        /// QEMU version.
        "qemu" => pub qemu: VersionTriple,
        /// Package string.
        "package" => pub package: String,
    }
}

crate::qmp_struct! {
    /// `CommandInfo` (element of `query-commands`).
    pub struct CommandInfo("CommandInfo") {
        /// Command name.
        "name" => pub name: String,
    }
}

/// Stand-in description for `SchemaInfo` (introspection returns `[any]`-shaped data).
struct SchemaInfo;

impl SchemaType for SchemaInfo {
    fn describe() -> TypeDesc {
        TypeDesc::Object {
            name: "SchemaInfo",
            members: vec![
                super::schema::Member {
                    name: "name",
                    ty: String::describe,
                    optional: false,
                },
                super::schema::Member {
                    name: "meta-type",
                    ty: String::describe,
                    optional: false,
                },
                super::schema::Member {
                    name: "features",
                    ty: Vec::<String>::describe,
                    optional: true,
                },
            ],
            union: None,
        }
    }
}

impl<C: 'static> Default for Registry<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: 'static> Registry<C> {
    /// A registry holding the built-in commands.
    pub fn new() -> Self {
        let mut r = Registry {
            commands: Vec::new(),
            events: Vec::new(),
        };
        r.builtin(
            "qmp_capabilities",
            QmpCapabilitiesArgs::describe,
            Empty::describe,
            Kind::Capabilities,
        );
        r.builtin(
            "query-version",
            Empty::describe,
            VersionInfo::describe,
            Kind::QueryVersion,
        );
        r.builtin(
            "query-commands",
            Empty::describe,
            Vec::<CommandInfo>::describe,
            Kind::QueryCommands,
        );
        r.builtin(
            "query-qmp-schema",
            Empty::describe,
            Vec::<SchemaInfo>::describe,
            Kind::QuerySchema,
        );
        r
    }

    fn builtin(
        &mut self,
        name: &'static str,
        args: fn() -> TypeDesc,
        ret: fn() -> TypeDesc,
        kind: Kind<C>,
    ) {
        self.commands.push(Entry {
            name,
            args,
            ret,
            meta: CommandMeta::default(),
            kind,
        });
    }

    /// Register a command with typed arguments `A` and return `R`.
    pub fn command<A, R, F, Fut>(&mut self, name: &'static str, handler: F) -> &mut Self
    where
        A: SchemaType + DeserializeOwned + 'static,
        R: SchemaType + Serialize + 'static,
        F: Fn(Rc<C>, A) -> Fut + 'static,
        Fut: Future<Output = Result<R, QmpError>> + 'static,
    {
        self.command_with(name, CommandMeta::default(), handler)
    }

    /// Like [`Registry::command`], with introspection flags. Re-registering
    /// a name replaces the earlier command.
    pub fn command_with<A, R, F, Fut>(
        &mut self,
        name: &'static str,
        meta: CommandMeta,
        handler: F,
    ) -> &mut Self
    where
        A: SchemaType + DeserializeOwned + 'static,
        R: SchemaType + Serialize + 'static,
        F: Fn(Rc<C>, A) -> Fut + 'static,
        Fut: Future<Output = Result<R, QmpError>> + 'static,
    {
        let h: Handler<C> = Rc::new(move |ctx, v| {
            let args: A =
                serde_json::from_value(v).map_err(|e| QmpError::generic(e.to_string()))?;
            let fut = handler(ctx, args);
            Ok(Box::pin(async move {
                let r = fut.await?;
                serde_json::to_value(r).map_err(|e| QmpError::generic(e.to_string()))
            }) as HandlerFuture)
        });
        self.commands.retain(|e| e.name != name);
        self.commands.push(Entry {
            name,
            args: A::describe,
            ret: R::describe,
            meta,
            kind: Kind::User(h),
        });
        self
    }

    /// Declare an event and its data type (for introspection).
    pub fn event<T: SchemaType>(&mut self, name: &'static str) -> &mut Self {
        self.events.push((name, T::describe));
        self
    }

    /// Names of the registered commands, in registration order.
    pub fn command_names(&self) -> Vec<&'static str> {
        self.commands.iter().map(|e| e.name).collect()
    }

    /// `query-commands`' return value (QEMU lists the newest first).
    pub fn query_commands(&self) -> Value {
        Value::Array(
            self.commands
                .iter()
                .rev()
                .map(|e| json!({"name": e.name}))
                .collect(),
        )
    }

    /// `query-qmp-schema`'s return value.
    pub fn query_qmp_schema(&self) -> Value {
        let mut i = Introspector::new();
        for (name, d) in &self.events {
            i.event(name, d());
        }
        for e in &self.commands {
            i.command(e.name, (e.args)(), (e.ret)(), &e.meta);
        }
        Value::Array(i.finish())
    }

    /// Execute a request from `session`. Protocol-level checks, negotiation
    /// and argument parsing happen now; the handler runs in the returned
    /// future.
    pub fn execute(&self, session: &mut Session, ctx: &Rc<C>, req: Request) -> Execution {
        let id = req.id.clone();
        let err = |s: &Session, e: QmpError| Execution::Ready(s.error(&e, id.as_ref()));
        let entry = self.commands.iter().find(|e| e.name == req.command);
        let entry = match entry {
            Some(e) if session.mode() == Mode::Command || matches!(e.kind, Kind::Capabilities) => e,
            _ if session.mode() == Mode::Negotiation => {
                return err(
                    session,
                    QmpError::new(
                        QmpErrorClass::CommandNotFound,
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    ),
                )
            }
            Some(e) => e,
            None => {
                return err(
                    session,
                    QmpError::new(
                        QmpErrorClass::CommandNotFound,
                        format!("The command {} has not been found", req.command),
                    ),
                )
            }
        };
        if req.oob && !entry.meta.allow_oob {
            return err(
                session,
                QmpError::generic(format!("The command {} does not support OOB", entry.name)),
            );
        }
        let args = match coerce(
            Value::Object(req.arguments),
            &(entry.args)(),
            InputMode::Json,
        ) {
            Ok(a) => a,
            Err(d) => return err(session, QmpError::generic(d)),
        };
        let ok = |s: &Session, v: Value| Execution::Ready(s.success(v, id.as_ref()));
        match &entry.kind {
            Kind::Capabilities => {
                if session.mode() == Mode::Command {
                    return err(
                        session,
                        QmpError::new(
                            QmpErrorClass::CommandNotFound,
                            "Capabilities negotiation is already complete, command ignored",
                        ),
                    );
                }
                let want_oob = args
                    .get("enable")
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.iter().any(|c| c == "oob"));
                if want_oob && !session.config().oob {
                    return err(
                        session,
                        QmpError::generic("This monitor does not support Out-Of-Band (OOB)"),
                    );
                }
                session.enter_command_mode(want_oob);
                ok(session, json!({}))
            }
            Kind::QueryVersion => ok(session, session.version_info()),
            Kind::QueryCommands => ok(session, self.query_commands()),
            Kind::QuerySchema => ok(session, self.query_qmp_schema()),
            Kind::User(h) => match h(ctx.clone(), args) {
                Err(e) => err(session, e),
                Ok(fut) => {
                    let fmt = Session::new(session.config().clone());
                    Execution::Pending(Box::pin(async move {
                        match fut.await {
                            Ok(v) => fmt.success(v, id.as_ref()),
                            Err(e) => fmt.error(&e, id.as_ref()),
                        }
                    }))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::protocol::{Incoming, SessionConfig};
    use std::cell::RefCell;
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        let waker = Waker::from(Arc::new(Noop));
        let mut cx = Context::from_waker(&waker);
        let mut f = Box::pin(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    crate::qmp_struct! {
        /// Test arguments.
        pub struct ThresholdArgs("q_obj_block-set-write-threshold-arg") {
            /// Node.
            "node-name" => pub node_name: String,
            /// Threshold.
            "write-threshold" => pub write_threshold: u64,
        }
    }

    #[derive(Default)]
    struct Ctx {
        thresholds: RefCell<Vec<(String, u64)>>,
    }

    fn registry() -> Registry<Ctx> {
        let mut r = Registry::<Ctx>::new();
        r.command(
            "block-set-write-threshold",
            |ctx: Rc<Ctx>, a: ThresholdArgs| async move {
                if a.node_name == "missing" {
                    return Err(QmpError::generic(format!(
                        "Device '{}' not found",
                        a.node_name
                    )));
                }
                ctx.thresholds
                    .borrow_mut()
                    .push((a.node_name, a.write_threshold));
                Ok(Empty {})
            },
        );
        r.event::<ThresholdArgs>("BLOCK_WRITE_THRESHOLD");
        r
    }

    fn run(r: &Registry<Ctx>, s: &mut Session, ctx: &Rc<Ctx>, input: &str) -> Vec<String> {
        s.feed(input.as_bytes())
            .into_iter()
            .map(|i| match i {
                Incoming::Reply(l) => l,
                Incoming::Request(req) => match r.execute(s, ctx, req) {
                    Execution::Ready(l) => l,
                    Execution::Pending(f) => block_on(f),
                },
            })
            .collect()
    }

    /// Conversation replies taken from qemu-storage-daemon 10.0.
    #[test]
    fn negotiation_and_dispatch() {
        let r = registry();
        let ctx = Rc::new(Ctx::default());
        let mut s = Session::new(SessionConfig::default());
        assert_eq!(
            run(&r, &mut s, &ctx, "{\"execute\":\"query-version\"}"),
            ["{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n"]
        );
        assert_eq!(
            run(
                &r,
                &mut s,
                &ctx,
                "{\"execute\":\"qmp_capabilities\",\"id\":[1,{\"a\":2}]}"
            ),
            ["{\"return\": {}, \"id\": [1, {\"a\": 2}]}\r\n"]
        );
        assert_eq!(
            run(&r, &mut s, &ctx, "{\"execute\":\"qmp_capabilities\"}"),
            ["{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Capabilities negotiation is already complete, command ignored\"}}\r\n"]
        );
        assert_eq!(
            run(&r, &mut s, &ctx, "{\"execute\":\"nope\",\"id\":\"x\"}"),
            ["{\"id\": \"x\", \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\r\n"]
        );
        assert_eq!(
            run(&r, &mut s, &ctx, "{\"execute\":\"query-version\",\"arguments\":{\"x\":1}}"),
            ["{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'x' is unexpected\"}}\r\n"]
        );
        assert_eq!(
            run(&r, &mut s, &ctx, "{\"execute\":\"block-set-write-threshold\",\"arguments\":{\"node-name\":\"n\",\"write-threshold\":1.0}}"),
            ["{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'write-threshold' expects uint64\"}}\r\n"]
        );
        assert_eq!(
            run(&r, &mut s, &ctx, "{\"execute\":\"block-set-write-threshold\",\"arguments\":{\"node-name\":\"missing\",\"write-threshold\":-1}}"),
            ["{\"error\": {\"class\": \"GenericError\", \"desc\": \"Device 'missing' not found\"}}\r\n"]
        );
        assert_eq!(
            run(&r, &mut s, &ctx, "{\"execute\":\"block-set-write-threshold\",\"id\":7,\"arguments\":{\"node-name\":\"n\",\"write-threshold\":-1}}"),
            ["{\"return\": {}, \"id\": 7}\r\n"]
        );
        assert_eq!(
            ctx.thresholds.borrow().as_slice(),
            [("n".to_string(), u64::MAX)]
        );
    }

    #[test]
    fn introspection_and_query_commands() {
        let r = registry();
        let schema = r.query_qmp_schema();
        let list = schema.as_array().unwrap();
        assert_eq!(
            list[0],
            json!({"name": "BLOCK_WRITE_THRESHOLD", "meta-type": "event", "arg-type": "0"})
        );
        assert_eq!(
            list[1],
            json!({"name": "qmp_capabilities", "meta-type": "command", "arg-type": "1", "ret-type": "2"})
        );
        let cmd = list
            .iter()
            .find(|e| e["name"] == "block-set-write-threshold")
            .unwrap();
        assert_eq!(cmd["arg-type"], "0");
        let enum_ = list.iter().find(|e| e["meta-type"] == "enum").unwrap();
        assert_eq!(enum_["values"], json!(["oob"]));
        let cmds = r.query_commands();
        assert_eq!(cmds[0], json!({"name": "block-set-write-threshold"}));
        assert_eq!(cmds.as_array().unwrap().len(), 5);
    }
}
