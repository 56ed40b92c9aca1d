//! The load-time checker for rule conditions.
//!
//! The `cel` crate parses and evaluates CEL but has no type checker, so this
//! module walks each parsed condition against the field table of the rule's
//! event ([`crate::event::Field`]) and rejects, before any traffic flows:
//! unknown names and fields, fields of another event, type errors, unknown
//! functions, non-literal or invalid regular expressions, and conditions that
//! are not boolean. It accepts a deliberate subset of CEL (the standard
//! operators, `size`, `contains`, `startsWith`, `endsWith`, `matches`, the
//! conversions, `dyn` and the macros `has`, `all`, `exists`, `exists_one`,
//! `map`, `filter`), which the tests check against the `cel` interpreter.
//!
//! While walking it rewrites the tree for evaluation: an event field written
//! `http.request.host` becomes one identifier named `http.request.host`
//! (resolved in one lookup), and a field selection on a map becomes an index
//! (`headers.accept` is `headers["accept"]`, the same thing in CEL). It
//! records every node's type for [`super::lower`].

use std::collections::HashMap;
use std::fmt;

use cel::common::ast::{operators, CallExpr, EntryExpr, Expr, IdedExpr, LiteralValue};
use regex::Regex;

use crate::event::{EventKind, Field, FieldType};

/// Regular expressions may not compile to more than this many bytes.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A CEL type, as far as conditions need them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ty {
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    Null,
    List(Box<Ty>),
    Map(Box<Ty>, Box<Ty>),
    Dyn,
}

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ty::Bool => f.write_str("bool"),
            Ty::Int => f.write_str("int"),
            Ty::Uint => f.write_str("uint"),
            Ty::Double => f.write_str("double"),
            Ty::String => f.write_str("string"),
            Ty::Bytes => f.write_str("bytes"),
            Ty::Null => f.write_str("null"),
            Ty::List(elem) => write!(f, "list({elem})"),
            Ty::Map(key, value) => write!(f, "map({key}, {value})"),
            Ty::Dyn => f.write_str("dyn"),
        }
    }
}

impl Ty {
    fn is_numeric(&self) -> bool {
        matches!(self, Ty::Int | Ty::Uint | Ty::Double)
    }

    fn headers() -> Ty {
        Ty::Map(Box::new(Ty::String), Box::new(Ty::String))
    }

    fn of_field(field: Field) -> Ty {
        match field.field_type() {
            FieldType::String => Ty::String,
            FieldType::Int => Ty::Int,
            FieldType::Headers => Ty::headers(),
        }
    }
}

/// Whether `==` may compare the two types.
fn comparable(a: &Ty, b: &Ty) -> bool {
    match (a, b) {
        (Ty::Dyn, _) | (_, Ty::Dyn) => true,
        (Ty::List(x), Ty::List(y)) => comparable(x, y),
        (Ty::Map(k1, v1), Ty::Map(k2, v2)) => comparable(k1, k2) && comparable(v1, v2),
        _ => a == b || (a.is_numeric() && b.is_numeric()),
    }
}

/// Whether `<` may order the two types.
fn orderable(a: &Ty, b: &Ty) -> bool {
    match (a, b) {
        (Ty::Dyn, _) | (_, Ty::Dyn) => true,
        _ if a.is_numeric() && b.is_numeric() => true,
        _ => a == b && matches!(a, Ty::String | Ty::Bytes | Ty::Bool),
    }
}

/// The type two values of types `a` and `b` share, if any.
fn join(a: &Ty, b: &Ty) -> Option<Ty> {
    match (a, b) {
        _ if a == b => Some(a.clone()),
        (Ty::Dyn, _) | (_, Ty::Dyn) => Some(Ty::Dyn),
        (Ty::List(x), Ty::List(y)) => Some(Ty::List(Box::new(join(x, y)?))),
        (Ty::Map(k1, v1), Ty::Map(k2, v2)) => Some(Ty::Map(Box::new(join(k1, k2)?), Box::new(join(v1, v2)?))),
        _ => None,
    }
}

/// A problem found in a condition, at a node of the parsed tree.
#[derive(Debug)]
pub(crate) struct CheckError {
    pub id: u64,
    pub message: String,
}

type Checked = Result<Ty, CheckError>;

fn error(id: u64, message: impl Into<String>) -> CheckError {
    CheckError { id, message: message.into() }
}

/// What the checker learnt about a condition, for lowering.
#[derive(Debug, Default)]
pub(crate) struct Facts {
    /// The type of every node.
    pub types: HashMap<u64, Ty>,
    /// The compiled pattern of every `matches` call, by call node.
    pub regexes: HashMap<u64, Regex>,
}

pub(crate) struct Checker {
    event: EventKind,
    /// Comprehension variables in scope, innermost last.
    locals: Vec<(String, Ty)>,
    /// Ids for nodes the rewrite creates; they have no place in the source.
    next_id: u64,
    pub facts: Facts,
}

const NAMESPACES: [&str; 3] = ["dns", "http", "tcp"];

impl Checker {
    pub fn new(event: EventKind) -> Checker {
        Checker { event, locals: Vec::new(), next_id: u64::MAX / 2, facts: Facts::default() }
    }

    /// Checks and rewrites `expr`; returns its type.
    pub fn check(&mut self, expr: &mut IdedExpr) -> Checked {
        let ty = self.check_node(expr)?;
        self.facts.types.insert(expr.id, ty.clone());
        Ok(ty)
    }

    fn local(&self, name: &str) -> Option<&Ty> {
        self.locals.iter().rev().find(|(local, _)| local == name).map(|(_, ty)| ty)
    }

    /// The segments of `expr` when it names something under an event
    /// namespace (`http.request.host`): field selections on `dns`, `http`
    /// or `tcp`, unless a comprehension variable shadows that name.
    fn event_path(&self, expr: &IdedExpr) -> Option<Vec<String>> {
        let mut segments = Vec::new();
        let mut node = expr;
        loop {
            match &node.expr {
                Expr::Select(select) if !select.test => {
                    segments.push(select.field.clone());
                    node = &select.operand;
                }
                Expr::Ident(root) if NAMESPACES.contains(&root.as_str()) && self.local(root).is_none() => {
                    segments.push(root.clone());
                    segments.reverse();
                    return Some(segments);
                }
                _ => return None,
            }
        }
    }

    fn fields_of(kind: EventKind) -> String {
        Field::ALL
            .into_iter()
            .filter(|field| field.path().starts_with(kind.name()) && field.path()[kind.name().len()..].starts_with('.'))
            .map(Field::short_name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn available(&self) -> String {
        self.event.fields().map(Field::path).collect::<Vec<_>>().join(", ")
    }

    /// Resolves a three-segment event path to a field of this rule's event.
    fn field(&self, id: u64, path: &[String]) -> Result<Field, CheckError> {
        let event_name = format!("{}.{}", path[0], path[1]);
        let full = path.join(".");
        let Some(kind) = EventKind::from_name(&event_name) else {
            return Err(error(id, format!("unknown event `{event_name}` in `{full}`")));
        };
        let Some(field) = Field::from_path(&full) else {
            return Err(error(
                id,
                format!("unknown field `{}` of `{event_name}` (fields: {})", path[2], Self::fields_of(kind)),
            ));
        };
        if !field.events().contains(&self.event) {
            return Err(error(
                id,
                format!("`{full}` is not available in `{}` rules (available: {})", self.event, self.available()),
            ));
        }
        Ok(field)
    }

    /// The error for an event path that is too short to name a field.
    fn not_a_field(&self, id: u64, path: &[String]) -> CheckError {
        let name = path.join(".");
        match path.len() {
            1 => error(id, format!("`{name}` is not a field; conditions use fields such as {}", self.available())),
            _ => match EventKind::from_name(&name) {
                Some(kind) => error(
                    id,
                    format!("`{name}` is an event, not a field; use one of its fields: {}", Self::fields_of(kind)),
                ),
                None => error(id, format!("unknown event `{name}`")),
            },
        }
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Header names in events are lower case: a literal key with capitals
    /// could never be found.
    fn check_header_key(&self, map: &IdedExpr, key: &IdedExpr) -> Result<(), CheckError> {
        let is_headers = matches!(&map.expr, Expr::Ident(name)
            if Field::from_path(name).is_some_and(|f| f.field_type() == FieldType::Headers));
        if let (true, Expr::Literal(LiteralValue::String(key_text))) = (is_headers, &key.expr) {
            let text = key_text.inner();
            if text.chars().any(|c| c.is_ascii_uppercase()) {
                return Err(error(
                    key.id,
                    format!(
                        "header names are lower case in events: write `{}` instead of `{text}`",
                        text.to_ascii_lowercase()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_node(&mut self, expr: &mut IdedExpr) -> Checked {
        let id = expr.id;
        match &mut expr.expr {
            Expr::Unspecified => Err(error(id, "empty expression")),
            Expr::Literal(literal) => Ok(match literal {
                LiteralValue::Boolean(_) => Ty::Bool,
                LiteralValue::Bytes(_) => Ty::Bytes,
                LiteralValue::Double(_) => Ty::Double,
                LiteralValue::Int(_) => Ty::Int,
                LiteralValue::Null => Ty::Null,
                LiteralValue::String(_) => Ty::String,
                LiteralValue::UInt(_) => Ty::Uint,
            }),
            Expr::Ident(name) => {
                if let Some(ty) = self.local(name) {
                    return Ok(ty.clone());
                }
                if let Some(field) = Field::from_path(name) {
                    // Already rewritten (the checker may see a node twice).
                    return Ok(Ty::of_field(field));
                }
                let path = vec![name.clone()];
                if NAMESPACES.contains(&name.as_str()) {
                    return Err(self.not_a_field(id, &path));
                }
                Err(error(id, format!("unknown name `{name}`; conditions use fields such as {}", self.available())))
            }
            Expr::Select(select) if select.test => {
                if let Some(path) = self.event_path(&select.operand) {
                    if path.len() < 3 {
                        return Err(error(
                            id,
                            format!(
                                "has() cannot test `{}.{}`: event fields are always present; \
                                 has() tests map keys, e.g. has(http.request.headers.authorization)",
                                path.join("."),
                                select.field
                            ),
                        ));
                    }
                }
                let ty = self.check(&mut select.operand)?;
                let key = IdedExpr { id, expr: Expr::Literal(LiteralValue::String(select.field.clone().into())) };
                self.check_header_key(&select.operand, &key)?;
                match ty {
                    Ty::Map(key, _) if matches!(*key, Ty::String | Ty::Dyn) => Ok(Ty::Bool),
                    Ty::Dyn => Ok(Ty::Bool),
                    other => Err(error(id, format!("has() needs a map with string keys, found {other}"))),
                }
            }
            Expr::Select(_) => {
                if let Some(path) = self.event_path(expr) {
                    match path.len() {
                        0..=2 => return Err(self.not_a_field(id, &path)),
                        3 => {
                            let field = self.field(id, &path)?;
                            expr.expr = Expr::Ident(field.path().to_owned());
                            return Ok(Ty::of_field(field));
                        }
                        _ => {}
                    }
                }
                let Expr::Select(select) = &mut expr.expr else {
                    return Err(error(id, "internal: select expected"));
                };
                let field = select.field.clone();
                let operand_ty = self.check(&mut select.operand)?;
                match operand_ty {
                    Ty::Map(key, value) if matches!(*key, Ty::String | Ty::Dyn) => {
                        let key =
                            IdedExpr { id: self.fresh_id(), expr: Expr::Literal(LiteralValue::String(field.into())) };
                        self.check_header_key(&select.operand, &key)?;
                        self.facts.types.insert(key.id, Ty::String);
                        let operand = std::mem::take(&mut *select.operand);
                        expr.expr = Expr::Call(CallExpr {
                            func_name: operators::INDEX.to_owned(),
                            target: None,
                            args: vec![operand, key],
                        });
                        Ok(*value)
                    }
                    Ty::Dyn => Ok(Ty::Dyn),
                    other => Err(error(id, format!("cannot select `{field}` on {other}"))),
                }
            }
            Expr::Call(call) => self.check_call(id, call),
            Expr::List(list) => {
                let mut elem: Option<Ty> = None;
                for element in &mut list.elements {
                    let ty = self.check(element)?;
                    elem = Some(match elem {
                        None => ty,
                        Some(previous) => join(&previous, &ty).unwrap_or(Ty::Dyn),
                    });
                }
                Ok(Ty::List(Box::new(elem.unwrap_or(Ty::Dyn))))
            }
            Expr::Map(map) => {
                let mut key_ty: Option<Ty> = None;
                let mut value_ty: Option<Ty> = None;
                for entry in &mut map.entries {
                    let EntryExpr::MapEntry(entry) = &mut entry.expr else {
                        return Err(error(id, "message fields are not supported"));
                    };
                    let key = self.check(&mut entry.key)?;
                    if !matches!(key, Ty::String | Ty::Int | Ty::Uint | Ty::Bool | Ty::Dyn) {
                        return Err(error(
                            entry.key.id,
                            format!("a map key must be a string, int, uint or bool, found {key}"),
                        ));
                    }
                    let value = self.check(&mut entry.value)?;
                    key_ty = Some(key_ty.map_or(key.clone(), |k| join(&k, &key).unwrap_or(Ty::Dyn)));
                    value_ty = Some(value_ty.map_or(value.clone(), |v| join(&v, &value).unwrap_or(Ty::Dyn)));
                }
                Ok(Ty::Map(Box::new(key_ty.unwrap_or(Ty::Dyn)), Box::new(value_ty.unwrap_or(Ty::Dyn))))
            }
            Expr::Struct(structure) => {
                Err(error(id, format!("message construction (`{}{{...}}`) is not supported", structure.type_name)))
            }
            Expr::Comprehension(comprehension) => {
                if comprehension.iter_var2.is_some() {
                    return Err(error(id, "two-variable comprehensions are not supported"));
                }
                let range = self.check(&mut comprehension.iter_range)?;
                let item = match range {
                    Ty::List(elem) => *elem,
                    Ty::Map(key, _) => *key,
                    Ty::Dyn => Ty::Dyn,
                    other => return Err(error(comprehension.iter_range.id, format!("cannot iterate over {other}"))),
                };
                let accu = self.check(&mut comprehension.accu_init)?;
                self.locals.push((comprehension.iter_var.clone(), item));
                self.locals.push((comprehension.accu_var.clone(), accu));
                let result = self.check_comprehension_body(comprehension);
                self.locals.truncate(self.locals.len() - 2);
                result
            }
        }
    }

    fn check_comprehension_body(&mut self, comprehension: &mut cel::common::ast::ComprehensionExpr) -> Checked {
        let cond = self.check(&mut comprehension.loop_cond)?;
        if !matches!(cond, Ty::Bool | Ty::Dyn) {
            return Err(error(comprehension.loop_cond.id, format!("expected bool, found {cond}")));
        }
        let step = self.check(&mut comprehension.loop_step)?;
        // `map` and `filter` start from an empty list: the step tells the element type.
        if let Some((_, accu)) = self.locals.last_mut() {
            if let Some(joined) = join(accu, &step) {
                *accu = joined;
            }
        }
        self.check(&mut comprehension.result)
    }

    fn check_call(&mut self, id: u64, call: &mut CallExpr) -> Checked {
        let name = call.func_name.clone();
        let target = match &mut call.target {
            Some(target) => Some(self.check(target)?),
            None => None,
        };
        let mut args = Vec::with_capacity(call.args.len());
        for arg in &mut call.args {
            args.push(self.check(arg)?);
        }
        let mismatch = |what: &str| error(id, what.to_owned());
        let global = target.is_none();
        match (name.as_str(), args.as_slice()) {
            (operators::LOGICAL_AND | operators::LOGICAL_OR, [a, b]) if global => {
                let op = if name == operators::LOGICAL_AND { "&&" } else { "||" };
                for (ty, arg) in [(a, &call.args[0]), (b, &call.args[1])] {
                    if !matches!(ty, Ty::Bool | Ty::Dyn) {
                        return Err(error(arg.id, format!("`{op}` needs bool operands, found {ty}")));
                    }
                }
                Ok(Ty::Bool)
            }
            (operators::LOGICAL_NOT | operators::NOT_STRICTLY_FALSE, [a]) if global => match a {
                Ty::Bool | Ty::Dyn => Ok(Ty::Bool),
                other => Err(mismatch(&format!("`!` needs a bool, found {other}"))),
            },
            (operators::CONDITIONAL, [c, a, b]) if global => {
                if !matches!(c, Ty::Bool | Ty::Dyn) {
                    return Err(error(call.args[0].id, format!("the condition of `? :` must be a bool, found {c}")));
                }
                join(a, b).ok_or_else(|| mismatch(&format!("the branches of `? :` have different types: {a} and {b}")))
            }
            (operators::EQUALS | operators::NOT_EQUALS, [a, b]) if global => {
                if comparable(a, b) {
                    Ok(Ty::Bool)
                } else {
                    Err(mismatch(&format!("cannot compare {a} with {b}")))
                }
            }
            (operators::LESS | operators::LESS_EQUALS | operators::GREATER | operators::GREATER_EQUALS, [a, b])
                if global =>
            {
                if orderable(a, b) {
                    Ok(Ty::Bool)
                } else {
                    Err(mismatch(&format!("cannot order {a} and {b}")))
                }
            }
            (operators::ADD, [a, b]) if global => match (a, b) {
                (Ty::Dyn, _) | (_, Ty::Dyn) => Ok(Ty::Dyn),
                (Ty::List(x), Ty::List(y)) => Ok(Ty::List(Box::new(join(x, y).unwrap_or(Ty::Dyn)))),
                _ if a == b && matches!(a, Ty::Int | Ty::Uint | Ty::Double | Ty::String | Ty::Bytes) => Ok(a.clone()),
                _ => Err(mismatch(&format!("cannot add {a} and {b}"))),
            },
            (operators::SUBSTRACT | operators::MULTIPLY | operators::DIVIDE | operators::MODULO, [a, b]) if global => {
                let allowed = if name == operators::MODULO { matches!(a, Ty::Int | Ty::Uint) } else { a.is_numeric() };
                match (a, b) {
                    (Ty::Dyn, _) | (_, Ty::Dyn) => Ok(Ty::Dyn),
                    _ if a == b && allowed => Ok(a.clone()),
                    _ => Err(mismatch(&format!("arithmetic is not defined on {a} and {b}"))),
                }
            }
            (operators::NEGATE, [a]) if global => match a {
                Ty::Int | Ty::Double | Ty::Dyn => Ok(a.clone()),
                other => Err(mismatch(&format!("cannot negate {other}"))),
            },
            (operators::INDEX, [container, index]) if global => {
                self.check_header_key(&call.args[0], &call.args[1])?;
                match container {
                    Ty::List(elem) if matches!(index, Ty::Int | Ty::Uint | Ty::Dyn) => Ok((**elem).clone()),
                    Ty::Map(key, value) if comparable(key, index) => Ok((**value).clone()),
                    Ty::Map(key, _) => Err(mismatch(&format!("the keys of this map are {key}, not {index}"))),
                    Ty::Dyn => Ok(Ty::Dyn),
                    other => Err(mismatch(&format!("cannot index {other} with {index}"))),
                }
            }
            (operators::IN, [item, container]) if global => {
                self.check_header_key(&call.args[1], &call.args[0])?;
                let ok = match container {
                    Ty::List(elem) => comparable(item, elem),
                    Ty::Map(key, _) => comparable(item, key),
                    Ty::Dyn => true,
                    _ => false,
                };
                if ok {
                    Ok(Ty::Bool)
                } else {
                    Err(mismatch(&format!("cannot look for {item} in {container}")))
                }
            }
            ("size", _) => {
                let arg = match (&target, args.as_slice()) {
                    (None, [arg]) | (Some(arg), []) => arg,
                    _ => return Err(mismatch("size takes one argument: size(x) or x.size()")),
                };
                match arg {
                    Ty::String | Ty::Bytes | Ty::List(_) | Ty::Map(..) | Ty::Dyn => Ok(Ty::Int),
                    other => Err(mismatch(&format!("size() is not defined on {other}"))),
                }
            }
            ("contains" | "startsWith" | "endsWith", _) => match (&target, args.as_slice()) {
                (Some(Ty::String | Ty::Dyn), [Ty::String | Ty::Dyn]) => Ok(Ty::Bool),
                _ => Err(mismatch(&format!(
                    "`{name}` is called as <string>.{name}(<string>), found {}",
                    describe_call(&name, target.as_ref(), &args)
                ))),
            },
            ("matches", _) => {
                let pattern = match (&target, args.as_slice()) {
                    (Some(Ty::String | Ty::Dyn), [Ty::String | Ty::Dyn]) => &call.args[0],
                    (None, [Ty::String | Ty::Dyn, Ty::String | Ty::Dyn]) => &call.args[1],
                    _ => {
                        return Err(mismatch(&format!(
                            "`matches` is called as <string>.matches(<pattern>), found {}",
                            describe_call(&name, target.as_ref(), &args)
                        )))
                    }
                };
                let Expr::Literal(LiteralValue::String(text)) = &pattern.expr else {
                    return Err(error(pattern.id, "the pattern of matches() must be a string literal"));
                };
                let regex = regex::RegexBuilder::new(text.inner())
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| error(pattern.id, format!("invalid regular expression: {}", regex_problem(&e))))?;
                self.facts.regexes.insert(id, regex);
                Ok(Ty::Bool)
            }
            ("int" | "uint" | "double" | "string" | "bool" | "bytes" | "dyn", [arg]) if global => {
                let accepted = match name.as_str() {
                    "int" | "uint" | "double" => matches!(arg, Ty::Int | Ty::Uint | Ty::Double | Ty::String),
                    "string" => matches!(arg, Ty::Int | Ty::Uint | Ty::Double | Ty::String | Ty::Bool | Ty::Bytes),
                    "bool" => matches!(arg, Ty::Bool | Ty::String),
                    "bytes" => matches!(arg, Ty::Bytes | Ty::String),
                    _ => true,
                };
                if !accepted && *arg != Ty::Dyn {
                    return Err(mismatch(&format!("cannot convert {arg} with {name}()")));
                }
                Ok(match name.as_str() {
                    "int" => Ty::Int,
                    "uint" => Ty::Uint,
                    "double" => Ty::Double,
                    "string" => Ty::String,
                    "bool" => Ty::Bool,
                    "bytes" => Ty::Bytes,
                    _ => Ty::Dyn,
                })
            }
            _ => Err(mismatch(&format!(
                "unknown function `{}` (conditions may use the CEL operators, size, contains, startsWith, \
                 endsWith, matches, int, uint, double, string, bool, bytes, dyn and the macros has, all, \
                 exists, exists_one, map, filter)",
                name.trim_start_matches('@')
            ))),
        }
    }
}

fn describe_call(name: &str, target: Option<&Ty>, args: &[Ty]) -> String {
    let args = args.iter().map(Ty::to_string).collect::<Vec<_>>().join(", ");
    match target {
        Some(target) => format!("{target}.{name}({args})"),
        None => format!("{name}({args})"),
    }
}

/// The one-line reason in a `regex` error (its Display spans several lines).
fn regex_problem(error: &regex::Error) -> String {
    let text = error.to_string();
    text.lines()
        .find_map(|line| line.strip_prefix("error: "))
        .map_or_else(|| text.lines().last().unwrap_or_default().to_owned(), str::to_owned)
}
