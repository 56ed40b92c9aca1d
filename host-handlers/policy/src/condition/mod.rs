//! Rule conditions: CEL text compiled once at load, evaluated per event.
//!
//! Compiling is three steps: the `cel` crate parses the text; [`check`]
//! checks it against the rule's event (unknown fields, types, functions,
//! regular expressions) and rewrites field references; [`lower`] turns the
//! checked tree into a [`Cond`]. The parts of a condition that are plain
//! tests of event fields against literals (`==`, `!=`, `in [...]`,
//! `startsWith`, `endsWith`, `contains`, `matches`, integer comparisons,
//! header presence, combined with `&&`, `||`, `!` and `? :`) are evaluated
//! natively, without allocating; anything else is left to the `cel`
//! interpreter as a sub-expression. Both give the same result, errors
//! included: `&&` and `||` follow CEL's commutative error rules
//! (`false && error` is `false`, `true && error` is an error).

mod check;
mod lower;

use std::cell::OnceCell;
use std::sync::{Arc, OnceLock};

use cel::common::types::{CelBool, CelInt, CelMap, CelMapKey, CelString};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Context, Env, ExecutionError, IdedExpr, Value};
use regex::Regex;

use crate::event::{Event, EventKind, Field};

pub(crate) use check::Ty;

/// The longest condition accepted, in bytes.
pub(crate) const MAX_CONDITION_LEN: usize = 8192;

/// The deepest condition accepted, in levels of the parsed tree. The CEL
/// interpreter recurses once per level on whatever thread decides (tokio
/// workers have 2 MiB stacks), using about 3 KiB a level in release builds
/// and 60 KiB in debug builds. Chains of `&&` and `||` are parsed as
/// balanced trees, so even long ones take few levels.
pub(crate) const MAX_CONDITION_DEPTH: usize = 24;

/// The CEL environment conditions are parsed and evaluated in: the standard
/// library and macros, without the optional-value syntax.
pub(crate) fn environment() -> Env {
    Env::stdlib().with_optional_support(false)
}

/// A problem with a condition, at a byte offset of its text.
#[derive(Debug)]
pub(crate) struct CompileError {
    pub offset: usize,
    pub message: String,
}

/// A compiled condition.
#[derive(Debug)]
pub(crate) struct Condition {
    cond: Cond,
    /// The event fields the condition reads.
    reads: Box<[Field]>,
}

/// The evaluable form of a condition.
#[derive(Debug)]
pub(crate) enum Cond {
    Const(bool),
    Not(Box<Cond>),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    If(Box<Cond>, Box<Cond>, Box<Cond>),
    Str {
        op: StrOp,
        left: StrOperand,
        right: StrOperand,
    },
    Matches {
        subject: StrOperand,
        regex: Regex,
    },
    InList {
        subject: StrOperand,
        values: Box<[Box<str>]>,
    },
    HasKey {
        map: Field,
        key: StrOperand,
    },
    Int {
        op: IntOp,
        left: IntOperand,
        right: IntOperand,
    },
    /// A boolean sub-expression for the `cel` interpreter.
    Cel(IdedExpr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StrOp {
    Eq,
    Ne,
    StartsWith,
    EndsWith,
    Contains,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IntOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A string a native test reads.
#[derive(Debug)]
pub(crate) enum StrOperand {
    Field(Field),
    Literal(Box<str>),
    /// A string-valued sub-expression for the `cel` interpreter.
    Cel(IdedExpr),
}

/// An integer a native test reads.
#[derive(Debug)]
pub(crate) enum IntOperand {
    Field(Field),
    Literal(i64),
}

impl Condition {
    /// A condition that always holds (a rule without `if`).
    pub fn always() -> Condition {
        Condition { cond: Cond::Const(true), reads: Box::new([]) }
    }

    /// Parses, checks and compiles `text` for rules on `event`.
    pub fn compile(text: &str, event: EventKind, env: &Env) -> Result<Condition, CompileError> {
        let (expr, facts) = parse_and_check(text, event, env)?;
        let mut reads: Vec<Field> = nodes(&expr)
            .into_iter()
            .filter_map(|(node, _)| match &node.expr {
                cel::common::ast::Expr::Ident(name) => Field::from_path(name),
                _ => None,
            })
            .collect();
        reads.sort_unstable_by_key(|field| field.path());
        reads.dedup();
        Ok(Condition { cond: lower::lower(&expr, &facts), reads: reads.into() })
    }

    /// Whether the condition reads `field` (e.g. whether a rule names the
    /// port of an HTTP request).
    pub fn reads(&self, field: Field) -> bool {
        self.reads.contains(&field)
    }

    /// Evaluates the condition. An `Err` is a CEL evaluation error (for
    /// example a missing map key).
    pub fn eval(&self, cx: &EvalCx<'_, '_, '_>) -> Result<bool, ExecutionError> {
        self.cond.eval(cx)
    }
}

/// Parses and checks `text` for rules on `event`: the rewritten tree and
/// what the checker learnt about it.
fn parse_and_check(text: &str, event: EventKind, env: &Env) -> Result<(IdedExpr, check::Facts), CompileError> {
    if text.trim().is_empty() {
        return Err(CompileError { offset: 0, message: "the condition is empty".into() });
    }
    if text.len() > MAX_CONDITION_LEN {
        return Err(CompileError {
            offset: 0,
            message: format!("the condition is longer than {MAX_CONDITION_LEN} bytes"),
        });
    }
    let (mut expr, source_info) = env.parser().parse_with_source_info(text).map_err(|errors| {
        // Prefer the parser's syntax errors to its follow-up complaints.
        let first = errors.errors.iter().find(|e| e.msg.starts_with("Syntax error")).or(errors.errors.first());
        match first {
            Some(e) if e.msg.contains("Recursion limit") => {
                CompileError { offset: 0, message: "the condition nests deeper than the parser allows".into() }
            }
            Some(e) => CompileError {
                offset: offset_of(text, e.pos),
                message: format!("invalid condition: {}", e.msg.replacen("Syntax error", "syntax error", 1)),
            },
            None => CompileError { offset: 0, message: "invalid condition".into() },
        }
    })?;
    let node_offset = |id: u64| source_info.offset_for(id).map_or(0, |(start, _)| usize::try_from(start).unwrap_or(0));
    let mut checker = check::Checker::new(event);
    let ty = checker.check(&mut expr).map_err(|e| CompileError { offset: node_offset(e.id), message: e.message })?;
    if !matches!(ty, Ty::Bool | Ty::Dyn) {
        return Err(CompileError {
            offset: node_offset(expr.id),
            message: format!("the condition must be a bool, found {ty}"),
        });
    }
    // Measured on the checked tree, where a field such as `http.request.host`
    // is one level, as the interpreter sees it.
    if let Some(id) = too_deep(&expr) {
        return Err(CompileError {
            offset: node_offset(id),
            message: format!("the condition nests deeper than {MAX_CONDITION_DEPTH} levels"),
        });
    }
    Ok((expr, checker.facts))
}

/// The first node found deeper than [`MAX_CONDITION_DEPTH`], if any.
fn too_deep(expr: &IdedExpr) -> Option<u64> {
    nodes(expr).into_iter().find(|&(_, depth)| depth > MAX_CONDITION_DEPTH).map(|(node, _)| node.id)
}

/// Every node of the tree with its depth (the root is at depth 1). Walks
/// without recursing, as the tree may be arbitrarily deep; below
/// [`MAX_CONDITION_DEPTH`] + 1 levels it stops descending, which is as far
/// as [`too_deep`] needs to see.
fn nodes(expr: &IdedExpr) -> Vec<(&IdedExpr, usize)> {
    use cel::common::ast::{EntryExpr, Expr};
    let mut found = Vec::new();
    let mut pending = vec![(expr, 1)];
    while let Some((node, depth)) = pending.pop() {
        found.push((node, depth));
        if depth > MAX_CONDITION_DEPTH {
            continue;
        }
        let below = depth + 1;
        match &node.expr {
            Expr::Call(call) => {
                pending.extend(call.target.iter().map(|target| (&**target, below)));
                pending.extend(call.args.iter().map(|arg| (arg, below)));
            }
            Expr::Select(select) => pending.push((&select.operand, below)),
            Expr::List(list) => pending.extend(list.elements.iter().map(|element| (element, below))),
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(entry) = &entry.expr {
                        pending.push((&entry.key, below));
                        pending.push((&entry.value, below));
                    }
                }
            }
            Expr::Struct(structure) => {
                for entry in &structure.entries {
                    if let EntryExpr::StructField(field) = &entry.expr {
                        pending.push((&field.value, below));
                    }
                }
            }
            Expr::Comprehension(comprehension) => {
                for part in [
                    &comprehension.iter_range,
                    &comprehension.accu_init,
                    &comprehension.loop_cond,
                    &comprehension.loop_step,
                    &comprehension.result,
                ] {
                    pending.push((part, below));
                }
            }
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        }
    }
    found
}

/// The byte offset of a 1-based (line, column) position of the parser.
fn offset_of(text: &str, (line, column): (isize, isize)) -> usize {
    let mut offset = 0;
    for (index, line_text) in text.split_inclusive('\n').enumerate() {
        if isize::try_from(index + 1).unwrap_or(isize::MAX) == line {
            let column = usize::try_from(column.saturating_sub(1)).unwrap_or(0);
            return offset + line_text.char_indices().nth(column).map_or(line_text.len(), |(at, _)| at);
        }
        offset += line_text.len();
    }
    text.len()
}

/// What evaluating conditions on one event needs. The CEL context (and the
/// variables it reads) are only built if a condition needs the interpreter.
pub(crate) struct EvalCx<'c, 'v, 'e> {
    event: &'e Event,
    env: &'c Arc<Env>,
    vars: &'v OnceCell<EventVars<'e>>,
    context: &'c OnceCell<Context<'v, 'v>>,
    ip: OnceCell<String>,
}

/// Runs `f` with an evaluation context for `event`.
pub(crate) fn with_event<R>(event: &Event, env: &Arc<Env>, f: impl FnOnce(&EvalCx<'_, '_, '_>) -> R) -> R {
    let vars = OnceCell::new();
    let context = OnceCell::new();
    let cx = EvalCx { event, env, vars: &vars, context: &context, ip: OnceCell::new() };
    f(&cx)
}

impl<'c, 'v, 'e: 'v> EvalCx<'c, 'v, 'e> {
    fn context(&self) -> &'c Context<'v, 'v> {
        self.context.get_or_init(|| {
            let vars: &'v EventVars<'e> = self.vars.get_or_init(|| EventVars::new(self.event));
            let mut context = Context::with_env(Arc::clone(self.env));
            context.set_variable_resolver(vars);
            context
        })
    }

    fn str_field(&self, field: Field) -> &str {
        if field == Field::TcpIp {
            return self.ip.get_or_init(|| self.event.ip_text());
        }
        self.event.str_field(field).unwrap_or_default()
    }

    /// Runs `f` on the string an operand stands for.
    fn with_str<R>(&self, operand: &StrOperand, f: impl FnOnce(&str) -> R) -> Result<R, ExecutionError> {
        match operand {
            StrOperand::Field(field) => Ok(f(self.str_field(*field))),
            StrOperand::Literal(text) => Ok(f(text)),
            StrOperand::Cel(expr) => {
                let value = Value::resolve_val(expr, self.context())?;
                match value.downcast_ref::<CelString>() {
                    Some(text) => Ok(f(text.inner())),
                    None => Err(ExecutionError::UnexpectedType {
                        got: value.get_type().name().to_owned(),
                        want: "string".to_owned(),
                    }),
                }
            }
        }
    }

    fn int(&self, operand: &IntOperand) -> i64 {
        match operand {
            IntOperand::Field(field) => self.event.int_field(*field).unwrap_or_default(),
            IntOperand::Literal(value) => *value,
        }
    }
}

impl Cond {
    fn eval(&self, cx: &EvalCx<'_, '_, '_>) -> Result<bool, ExecutionError> {
        match self {
            Cond::Const(value) => Ok(*value),
            Cond::Not(inner) => inner.eval(cx).map(|value| !value),
            Cond::And(left, right) => match left.eval(cx) {
                Ok(false) => Ok(false),
                left => match (left, right.eval(cx)) {
                    (_, Ok(false)) => Ok(false),
                    (Ok(true), right) => right,
                    (Err(error), _) => Err(error),
                    (Ok(false), _) => Ok(false),
                },
            },
            Cond::Or(left, right) => match left.eval(cx) {
                Ok(true) => Ok(true),
                left => match (left, right.eval(cx)) {
                    (_, Ok(true)) => Ok(true),
                    (Ok(false), right) => right,
                    (Err(error), _) => Err(error),
                    (Ok(true), _) => Ok(true),
                },
            },
            Cond::If(test, then, otherwise) => {
                if test.eval(cx)? {
                    then.eval(cx)
                } else {
                    otherwise.eval(cx)
                }
            }
            Cond::Str { op, left, right } => cx.with_str(left, |left| {
                cx.with_str(right, |right| match op {
                    StrOp::Eq => left == right,
                    StrOp::Ne => left != right,
                    StrOp::StartsWith => left.starts_with(right),
                    StrOp::EndsWith => left.ends_with(right),
                    StrOp::Contains => left.contains(right),
                })
            })?,
            Cond::Matches { subject, regex } => cx.with_str(subject, |text| regex.is_match(text)),
            Cond::InList { subject, values } => {
                cx.with_str(subject, |text| values.binary_search_by(|v| (**v).cmp(text)).is_ok())
            }
            Cond::HasKey { map, key } => {
                let headers = cx.event.headers_field(*map);
                cx.with_str(key, |key| headers.is_some_and(|headers| headers.contains_key(key)))
            }
            Cond::Int { op, left, right } => {
                let (left, right) = (cx.int(left), cx.int(right));
                Ok(match op {
                    IntOp::Eq => left == right,
                    IntOp::Ne => left != right,
                    IntOp::Lt => left < right,
                    IntOp::Le => left <= right,
                    IntOp::Gt => left > right,
                    IntOp::Ge => left >= right,
                })
            }
            Cond::Cel(expr) => {
                let value = Value::resolve_val(expr, cx.context())?;
                match value.downcast_ref::<CelBool>() {
                    Some(value) => Ok(*value.inner()),
                    None => Err(ExecutionError::UnexpectedType {
                        got: value.get_type().name().to_owned(),
                        want: "bool".to_owned(),
                    }),
                }
            }
        }
    }
}

/// The event's fields as CEL values, for the interpreter. Each field
/// identifier (`http.request.host`) resolves to a value borrowed from here.
struct EventVars<'e> {
    strings: [CelString<'e>; Field::ALL.len()],
    ints: [CelInt; Field::ALL.len()],
    maps: [OnceLock<CelMap<'e>>; Field::ALL.len()],
    event: &'e Event,
}

impl<'e> EventVars<'e> {
    fn new(event: &'e Event) -> EventVars<'e> {
        let strings = Field::ALL.map(|field| match field {
            Field::TcpIp => CelString::from(event.ip_text()),
            _ => CelString::from(event.str_field(field).unwrap_or_default()),
        });
        let ints = Field::ALL.map(|field| CelInt::from(event.int_field(field).unwrap_or_default()));
        EventVars { strings, ints, maps: Default::default(), event }
    }
}

impl<'e> VariableResolver for EventVars<'e> {
    fn resolve<'b>(&'b self, variable: &str) -> Option<CowVal<'b, 'b>> {
        let index = Field::ALL.iter().position(|field| field.path() == variable)?;
        let field = Field::ALL[index];
        let value: &dyn Val = match field.field_type() {
            crate::event::FieldType::String => &self.strings[index],
            crate::event::FieldType::Int => &self.ints[index],
            crate::event::FieldType::Headers => self.maps[index].get_or_init(|| {
                let headers = self.event.headers_field(field);
                CelMap::from(
                    headers
                        .into_iter()
                        .flatten()
                        .map(|(name, value)| {
                            (
                                CelMapKey::from(name.as_str()),
                                Box::new(CelString::from(value.as_str())) as Box<dyn Val + 'e>,
                            )
                        })
                        .collect::<std::collections::HashMap<_, _>>(),
                )
            }),
        };
        Some(CowVal::Borrowed(value))
    }
}

#[cfg(test)]
mod tests;
