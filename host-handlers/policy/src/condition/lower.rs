//! Lowering a checked condition to a [`Cond`]: the shapes that are plain
//! tests of event fields become native tests; everything else stays a CEL
//! sub-expression. Only shapes whose native evaluation is exactly CEL's are
//! lowered: their operands are fields that every event of the rule's kind
//! carries, or literals, so they cannot fail.

use cel::common::ast::{operators, Expr, IdedExpr, LiteralValue};

use super::check::{Facts, Ty};
use super::{Cond, IntOp, IntOperand, StrOp, StrOperand};
use crate::event::{Field, FieldType};

pub(super) fn lower(expr: &IdedExpr, facts: &Facts) -> Cond {
    native(expr, facts).unwrap_or_else(|| Cond::Cel(expr.clone()))
}

fn ty<'f>(facts: &'f Facts, expr: &IdedExpr) -> Option<&'f Ty> {
    facts.types.get(&expr.id)
}

fn field_of(expr: &IdedExpr, wanted: FieldType) -> Option<Field> {
    match &expr.expr {
        Expr::Ident(name) => Field::from_path(name).filter(|field| field.field_type() == wanted),
        _ => None,
    }
}

fn string_literal(expr: &IdedExpr) -> Option<&str> {
    match &expr.expr {
        Expr::Literal(LiteralValue::String(text)) => Some(text.inner()),
        _ => None,
    }
}

fn str_operand(expr: &IdedExpr) -> StrOperand {
    if let Some(field) = field_of(expr, FieldType::String) {
        return StrOperand::Field(field);
    }
    if let Some(text) = string_literal(expr) {
        return StrOperand::Literal(text.into());
    }
    StrOperand::Cel(expr.clone())
}

fn int_operand(expr: &IdedExpr) -> Option<IntOperand> {
    if let Some(field) = field_of(expr, FieldType::Int) {
        return Some(IntOperand::Field(field));
    }
    match &expr.expr {
        Expr::Literal(LiteralValue::Int(value)) => Some(IntOperand::Literal(*value.inner())),
        _ => None,
    }
}

fn both_strings(facts: &Facts, a: &IdedExpr, b: &IdedExpr) -> bool {
    ty(facts, a) == Some(&Ty::String) && ty(facts, b) == Some(&Ty::String)
}

fn native(expr: &IdedExpr, facts: &Facts) -> Option<Cond> {
    let call = match &expr.expr {
        Expr::Literal(LiteralValue::Boolean(value)) => return Some(Cond::Const(*value.inner())),
        Expr::Select(select) if select.test => {
            let map = field_of(&select.operand, FieldType::Headers)?;
            return Some(Cond::HasKey { map, key: StrOperand::Literal(select.field.as_str().into()) });
        }
        Expr::Call(call) => call,
        _ => return None,
    };
    let args = call.args.as_slice();
    match (call.func_name.as_str(), &call.target, args) {
        (operators::LOGICAL_AND, None, [a, b]) => Some(Cond::And(Box::new(lower(a, facts)), Box::new(lower(b, facts)))),
        (operators::LOGICAL_OR, None, [a, b]) => Some(Cond::Or(Box::new(lower(a, facts)), Box::new(lower(b, facts)))),
        (operators::LOGICAL_NOT, None, [a]) if ty(facts, a) == Some(&Ty::Bool) => {
            Some(Cond::Not(Box::new(lower(a, facts))))
        }
        (operators::CONDITIONAL, None, [test, then, otherwise])
            if ty(facts, test) == Some(&Ty::Bool) && ty(facts, expr) == Some(&Ty::Bool) =>
        {
            Some(Cond::If(
                Box::new(lower(test, facts)),
                Box::new(lower(then, facts)),
                Box::new(lower(otherwise, facts)),
            ))
        }
        (operators::EQUALS | operators::NOT_EQUALS, None, [a, b]) => {
            let equal = call.func_name == operators::EQUALS;
            if both_strings(facts, a, b) {
                let op = if equal { StrOp::Eq } else { StrOp::Ne };
                return Some(Cond::Str { op, left: str_operand(a), right: str_operand(b) });
            }
            let op = if equal { IntOp::Eq } else { IntOp::Ne };
            Some(Cond::Int { op, left: int_operand(a)?, right: int_operand(b)? })
        }
        (operators::LESS | operators::LESS_EQUALS | operators::GREATER | operators::GREATER_EQUALS, None, [a, b]) => {
            let op = match call.func_name.as_str() {
                operators::LESS => IntOp::Lt,
                operators::LESS_EQUALS => IntOp::Le,
                operators::GREATER => IntOp::Gt,
                _ => IntOp::Ge,
            };
            Some(Cond::Int { op, left: int_operand(a)?, right: int_operand(b)? })
        }
        ("startsWith" | "endsWith" | "contains", Some(target), [arg]) if both_strings(facts, target, arg) => {
            let op = match call.func_name.as_str() {
                "startsWith" => StrOp::StartsWith,
                "endsWith" => StrOp::EndsWith,
                _ => StrOp::Contains,
            };
            Some(Cond::Str { op, left: str_operand(target), right: str_operand(arg) })
        }
        ("matches", Some(subject), [_]) if ty(facts, subject) == Some(&Ty::String) => {
            let regex = facts.regexes.get(&expr.id)?.clone();
            Some(Cond::Matches { subject: str_operand(subject), regex })
        }
        ("matches", None, [subject, _]) if ty(facts, subject) == Some(&Ty::String) => {
            let regex = facts.regexes.get(&expr.id)?.clone();
            Some(Cond::Matches { subject: str_operand(subject), regex })
        }
        (operators::IN, None, [item, container]) if ty(facts, item) == Some(&Ty::String) => {
            if let Some(map) = field_of(container, FieldType::Headers) {
                return Some(Cond::HasKey { map, key: str_operand(item) });
            }
            let Expr::List(list) = &container.expr else {
                return None;
            };
            if !list.optional_indices.is_empty() {
                return None;
            }
            let mut values = list
                .elements
                .iter()
                .map(|element| string_literal(element).map(Box::<str>::from))
                .collect::<Option<Vec<_>>>()?;
            values.sort();
            values.dedup();
            Some(Cond::InList { subject: str_operand(item), values: values.into_boxed_slice() })
        }
        _ => None,
    }
}
