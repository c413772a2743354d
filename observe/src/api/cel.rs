//! CEL filters (`FlowFilter.experimental.cel_expression`, `hubble observe
//! --cel-expression`), evaluated as Hubble evaluates them: each expression
//! sees the flow as the variable `_flow` with the flow API's field names
//! (`_flow.source.namespace`, `_flow.l4.TCP.destination_port`,
//! `_flow.verdict`), enums as their numbers with their names as constants
//! (`Verdict.DROPPED`, also `flow.Verdict.DROPPED`), and a filter's
//! expressions match when any of them is true.
//!
//! Compiling checks what a type checker would catch most often: every
//! `_flow` field path names fields the Flow message has, every name is
//! declared, and a bare path or literal is a bool. Evaluating an expression
//! that fails (an unset message read through, a type mismatch) is not a match,
//! as in Hubble. Known differences from Hubble's cel-go: reading through an
//! unset message field fails (no match) where cel-go reads the defaults, and
//! `_flow.time` is `{seconds, nanos}`, not a CEL timestamp (the time window
//! is `since`/`until`).
//!
//! What a client may ask is bounded: [`MAX_EXPRESSION_BYTES`] per expression,
//! and the expressions of a request together count against the request's
//! regular-expression budget (`filter::MAX_REGEXES`) since each may hold one.

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock},
};

use cel::{
    Context, Program, Value,
    common::ast::{EntryExpr, Expr, IdedExpr},
    objects::Key,
};
use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage};

use weft_flow::proto::flow;

/// The longest expression accepted.
pub const MAX_EXPRESSION_BYTES: usize = 4096;
/// How deep nested messages are converted (the Flow message is about 5 deep).
const MAX_DEPTH: usize = 16;

/// An expression that does not compile, with why.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{expression:?}: {problem}")]
pub struct CelError {
    pub expression: String,
    pub problem: String,
}

/// The compiled expressions of one FlowFilter.
pub struct CelFilter {
    programs: Vec<Program>,
}

impl std::fmt::Debug for CelFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CelFilter({} expressions)", self.programs.len())
    }
}

fn flow_descriptor() -> MessageDescriptor {
    weft_flow::json::pool().get_message_by_name("flow.Flow").expect("flow.Flow is in the API")
}

/// The enums of package `flow`: name -> (value name -> number).
fn enums() -> &'static HashMap<String, Value> {
    static ENUMS: LazyLock<HashMap<String, Value>> = LazyLock::new(|| {
        weft_flow::json::pool()
            .all_enums()
            .filter(|e| e.package_name() == "flow" && e.parent_message().is_none())
            .map(|e| {
                let values: HashMap<String, Value> =
                    e.values().map(|v| (v.name().to_owned(), Value::Int(i64::from(v.number())))).collect();
                (e.name().to_owned(), Value::from(values))
            })
            .collect()
    });
    &ENUMS
}

/// The environment: the standard library, its macros and regex `matches`.
fn env() -> &'static Arc<cel::Env> {
    static ENV: LazyLock<Arc<cel::Env>> = LazyLock::new(|| Arc::new(cel::Env::stdlib()));
    &ENV
}

impl CelFilter {
    /// Compiles a filter's expressions; the error names the expression.
    pub fn compile(expressions: &[String]) -> Result<CelFilter, CelError> {
        let programs = expressions
            .iter()
            .map(|e| {
                let err = |problem: String| CelError { expression: e.clone(), problem };
                if e.len() > MAX_EXPRESSION_BYTES {
                    return Err(err(format!("{} bytes, at most {MAX_EXPRESSION_BYTES} are allowed", e.len())));
                }
                let program = env().compile(e).map_err(|p| err(p.to_string().trim().to_owned()))?;
                check(program.expression(), &mut Vec::new(), 0).map_err(err)?;
                if let Some(kind) = result_kind(program.expression())
                    && kind != "bool"
                {
                    return Err(err(format!("the expression is a {kind}, a filter must be a bool")));
                }
                Ok(program)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CelFilter { programs })
    }

    /// Is any expression true of this flow?
    pub fn matches(&self, f: &flow::Flow) -> bool {
        let mut ctx = Context::with_env(env().clone());
        ctx.add_variable_from_value("_flow", flow_value(f));
        for (name, values) in enums() {
            ctx.add_variable_from_value(name.clone(), values.clone());
        }
        ctx.add_variable_from_value("flow", Value::from(enums().clone()));
        self.programs.iter().any(|p| matches!(p.execute(&ctx), Ok(Value::Bool(true))))
    }
}

/// `_flow` for an expression: every field by its protobuf name; messages
/// only when set (so `has(_flow.l4.TCP)` asks what it says), scalars and
/// lists always (proto3 has no presence for them), wrappers as their value or
/// null.
pub fn flow_value(f: &flow::Flow) -> Value {
    let m = DynamicMessage::decode(flow_descriptor(), f.encode_to_vec().as_slice()).expect("a Flow decodes as a Flow");
    message_value(&m, 0)
}

fn message_value(m: &DynamicMessage, depth: usize) -> Value {
    let desc = m.descriptor();
    match desc.full_name() {
        "google.protobuf.BoolValue"
        | "google.protobuf.UInt32Value"
        | "google.protobuf.Int32Value"
        | "google.protobuf.UInt64Value"
        | "google.protobuf.Int64Value"
        | "google.protobuf.StringValue" => {
            return desc.get_field_by_name("value").map_or(Value::Null, |fd| scalar(&m.get_field(&fd)));
        }
        "google.protobuf.Any" => return Value::Null,
        _ => {}
    }
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    let mut out: HashMap<Key, Value> = HashMap::new();
    for fd in desc.fields() {
        if matches!(fd.kind(), Kind::Message(_)) && !fd.is_list() && !fd.is_map() && !m.has_field(&fd) {
            continue;
        }
        out.insert(Key::from(fd.name().to_owned()), field_value(&m.get_field(&fd), depth));
    }
    Value::Map(cel::objects::Map { map: Arc::new(out) })
}

fn field_value(v: &prost_reflect::Value, depth: usize) -> Value {
    use prost_reflect::Value as V;
    match v {
        V::List(items) => Value::List(Arc::new(items.iter().map(|i| field_value(i, depth)).collect())),
        V::Map(entries) => {
            let map: HashMap<Key, Value> = entries
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        prost_reflect::MapKey::String(s) => Key::from(s.clone()),
                        prost_reflect::MapKey::Bool(b) => Key::from(*b),
                        prost_reflect::MapKey::I32(i) => Key::from(i64::from(*i)),
                        prost_reflect::MapKey::I64(i) => Key::from(*i),
                        prost_reflect::MapKey::U32(u) => Key::from(u64::from(*u)),
                        prost_reflect::MapKey::U64(u) => Key::from(*u),
                    };
                    (key, field_value(v, depth))
                })
                .collect();
            Value::Map(cel::objects::Map { map: Arc::new(map) })
        }
        V::Message(m) => message_value(m, depth + 1),
        other => scalar(other),
    }
}

fn scalar(v: &prost_reflect::Value) -> Value {
    use prost_reflect::Value as V;
    match v {
        V::Bool(b) => Value::Bool(*b),
        V::I32(i) => Value::Int(i64::from(*i)),
        V::I64(i) => Value::Int(*i),
        V::U32(u) => Value::UInt(u64::from(*u)),
        V::U64(u) => Value::UInt(*u),
        V::F32(f) => Value::Float(f64::from(*f)),
        V::F64(f) => Value::Float(*f),
        V::String(s) => Value::from(s.as_str()),
        V::Bytes(b) => Value::Bytes(Arc::new(b.to_vec())),
        V::EnumNumber(n) => Value::Int(i64::from(*n)),
        V::Message(_) | V::List(_) | V::Map(_) => Value::Null,
    }
}

/// What a declared name or `_flow` path is, as far as compiling can tell.
enum Resolved {
    /// A message (more fields may follow).
    Message(MessageDescriptor),
    /// A scalar, enum, list or map: its CEL kind.
    Value(&'static str),
    /// Something not checked further (enum constants, comprehension variables).
    Unknown,
}

fn field_kind(fd: &FieldDescriptor) -> Resolved {
    if fd.is_list() {
        return Resolved::Value("list");
    }
    if fd.is_map() {
        return Resolved::Value("map");
    }
    match fd.kind() {
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.BoolValue" => Resolved::Value("bool"),
            n if n.starts_with("google.protobuf.") && n.ends_with("Value") => Resolved::Unknown,
            _ => Resolved::Message(m),
        },
        Kind::Bool => Resolved::Value("bool"),
        Kind::String => Resolved::Value("string"),
        Kind::Bytes => Resolved::Value("bytes"),
        Kind::Double | Kind::Float => Resolved::Value("double"),
        Kind::Uint32 | Kind::Uint64 | Kind::Fixed32 | Kind::Fixed64 => Resolved::Value("uint"),
        _ => Resolved::Value("int"),
    }
}

/// Resolves a select chain whose root is a name: `_flow.a.b` against the
/// Flow message; other declared names are not looked into.
fn resolve(e: &IdedExpr, scope: &[String]) -> Result<Resolved, String> {
    match &e.expr {
        Expr::Ident(name) if name == "_flow" => Ok(Resolved::Message(flow_descriptor())),
        Expr::Ident(name) if scope.contains(name) || name == "flow" || enums().contains_key(name) => {
            Ok(Resolved::Unknown)
        }
        Expr::Ident(name) => Err(format!("undeclared reference to {name:?} (the flow is _flow)")),
        Expr::Select(s) if !s.test => match resolve(&s.operand, scope)? {
            Resolved::Message(m) => match m.get_field_by_name(&s.field) {
                Some(fd) => Ok(field_kind(&fd)),
                None => Err(format!("{} has no field {:?}", m.full_name(), s.field)),
            },
            Resolved::Value(kind) => Err(format!("a {kind} has no field {:?}", s.field)),
            Resolved::Unknown => Ok(Resolved::Unknown),
        },
        _ => Ok(Resolved::Unknown),
    }
}

/// Checks every name and `_flow` path of an expression.
fn check(e: &IdedExpr, scope: &mut Vec<String>, depth: usize) -> Result<(), String> {
    if depth > 64 {
        return Err("the expression nests more than 64 levels".into());
    }
    let d = depth + 1;
    match &e.expr {
        Expr::Ident(_) => resolve(e, scope).map(|_| ()),
        Expr::Select(s) if s.test => {
            // has(x.f): x must resolve and, if a message, have f.
            if let Resolved::Message(m) = resolve(&s.operand, scope)?
                && m.get_field_by_name(&s.field).is_none()
            {
                return Err(format!("{} has no field {:?}", m.full_name(), s.field));
            }
            check(&s.operand, scope, d)
        }
        Expr::Select(s) => match resolve(e, scope) {
            Ok(_) => Ok(()),
            Err(problem) if root_is_name(&s.operand) => Err(problem),
            Err(_) => check(&s.operand, scope, d),
        },
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                check(t, scope, d)?;
            }
            c.args.iter().try_for_each(|a| check(a, scope, d))
        }
        Expr::Comprehension(c) => {
            check(&c.iter_range, scope, d)?;
            check(&c.accu_init, scope, d)?;
            let added = 2 + usize::from(c.iter_var2.is_some());
            scope.push(c.iter_var.clone());
            scope.push(c.accu_var.clone());
            scope.extend(c.iter_var2.clone());
            let r = [&c.loop_cond, &c.loop_step, &c.result].into_iter().try_for_each(|x| check(x, scope, d));
            scope.truncate(scope.len() - added);
            r
        }
        Expr::List(l) => l.elements.iter().try_for_each(|x| check(x, scope, d)),
        Expr::Map(m) => m.entries.iter().try_for_each(|entry| match &entry.expr {
            EntryExpr::MapEntry(me) => check(&me.key, scope, d).and_then(|_| check(&me.value, scope, d)),
            EntryExpr::StructField(sf) => check(&sf.value, scope, d),
        }),
        Expr::Struct(s) => Err(format!("message literals ({}) are not supported", s.type_name)),
        Expr::Literal(_) | Expr::Unspecified => Ok(()),
    }
}

fn root_is_name(e: &IdedExpr) -> bool {
    match &e.expr {
        Expr::Ident(_) => true,
        Expr::Select(s) if !s.test => root_is_name(&s.operand),
        _ => false,
    }
}

/// The kind of an expression that is a bare literal or `_flow` path.
fn result_kind(e: &IdedExpr) -> Option<&'static str> {
    use cel::common::ast::LiteralValue as L;
    match &e.expr {
        Expr::Literal(l) => Some(match l {
            L::Boolean(_) => "bool",
            L::Null => "null",
            L::String(_) => "string",
            L::Bytes(_) => "bytes",
            L::Int(_) => "int",
            L::UInt(_) => "uint",
            L::Double(_) => "double",
        }),
        Expr::Ident(_) | Expr::Select(_) => match resolve(e, &[]) {
            Ok(Resolved::Value(kind)) => Some(kind),
            Ok(Resolved::Message(_)) => Some("message"),
            _ => None,
        },
        Expr::List(_) => Some("list"),
        Expr::Map(_) => Some("map"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_flow::proto::flow::{Endpoint, Layer4, Tcp, Verdict, layer4};

    fn a_flow() -> flow::Flow {
        flow::Flow {
            verdict: Verdict::Dropped as i32,
            source: Some(Endpoint {
                namespace: "shop".into(),
                pod_name: "frontend-1".into(),
                labels: vec!["k8s:app=frontend".into()],
                ..Default::default()
            }),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp { source_port: 40000, destination_port: 8080, flags: None })),
            }),
            is_reply: Some(false),
            node_name: "node1".into(),
            ..Default::default()
        }
    }

    fn run(e: &str) -> bool {
        CelFilter::compile(&[e.to_owned()]).unwrap_or_else(|err| panic!("{err}")).matches(&a_flow())
    }

    #[test]
    fn expressions_read_the_flow_by_hubbles_field_names() {
        assert!(run(r#"_flow.source.namespace == "shop""#));
        assert!(run(r#"_flow.source.pod_name.startsWith("front") && _flow.node_name == "node1""#));
        assert!(run("_flow.l4.TCP.destination_port == 8080"));
        assert!(run("_flow.l4.TCP.destination_port > 1024u"));
        assert!(run("_flow.verdict == Verdict.DROPPED"));
        assert!(run("_flow.verdict == flow.Verdict.DROPPED"));
        assert!(run("_flow.verdict == 2"));
        assert!(!run("_flow.verdict == Verdict.FORWARDED"));
        assert!(run("has(_flow.l4.TCP) && !has(_flow.l4.UDP)"));
        assert!(run(r#"_flow.source.labels.exists(l, l == "k8s:app=frontend")"#));
        assert!(run(r#"_flow.source.pod_name.matches("^front.*-[0-9]$")"#));
        assert!(run("_flow.is_reply == false"));
        // Reading through a message the flow does not have: no match.
        assert!(!run("_flow.l4.UDP.destination_port == 53"));
        assert!(!run("_flow.destination.namespace == \"\""));
    }

    #[test]
    fn any_expression_of_a_filter_may_match() {
        let f = CelFilter::compile(&[r#"_flow.node_name == "other""#.into(), "_flow.verdict == 2".into()]).unwrap();
        assert!(f.matches(&a_flow()));
        let f = CelFilter::compile(&[r#"_flow.node_name == "other""#.into()]).unwrap();
        assert!(!f.matches(&a_flow()));
    }

    #[test]
    fn compile_errors_name_the_expression_and_the_problem() {
        let err = |e: &str| CelFilter::compile(&[e.to_owned()]).unwrap_err().to_string();
        let e = err("_flow.verdict ==");
        assert!(e.starts_with("\"_flow.verdict ==\": "), "{e}");
        let e = err("_flow.sorce.namespace == \"x\"");
        assert!(e.contains("flow.Flow has no field \"sorce\""), "{e}");
        let e = err("_flow.source.namespace.length == 1");
        assert!(e.contains("a string has no field \"length\""), "{e}");
        let e = err("flow_x == 1");
        assert!(e.contains("undeclared reference to \"flow_x\""), "{e}");
        let e = err("_flow.node_name");
        assert!(e.contains("is a string, a filter must be a bool"), "{e}");
        let e = err("has(_flow.l4.SCTPX)");
        assert!(e.contains("flow.Layer4 has no field \"SCTPX\""), "{e}");
        assert!(err(&"a".repeat(MAX_EXPRESSION_BYTES + 1)).contains("at most"));
        // Comprehension variables are declared inside their macro only.
        CelFilter::compile(&["_flow.source.labels.all(l, l.startsWith(\"k8s:\"))".into()]).unwrap();
        assert!(err("_flow.source.labels.all(l, true) && l == \"x\"").contains("undeclared reference to \"l\""));
    }
}
