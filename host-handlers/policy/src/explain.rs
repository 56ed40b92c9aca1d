//! Human-readable accounts of the engine: why an event gets its verdict
//! (`sandbox policy explain`) and what a set of profiles holds
//! (`sandbox policy check`). Secrets show as `[REDACTED]`.

use std::fmt;
use std::sync::Arc;

use crate::engine::{Inner, Layer, Rule, RuleDecision};
use crate::event::{Event, EventKind, Field};
use crate::location::Location;
use crate::{Decision, Verdict};

/// What a rule made of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The condition holds.
    Matched,
    /// The condition does not hold.
    NotMatched,
    /// The condition could not be evaluated; for block rules that counts as
    /// a match (fail closed), for others as no match.
    Failed {
        /// The evaluation error.
        error: String,
        /// Whether it counted as a match.
        counts_as_match: bool,
    },
    /// The rule is for another kind of event and was not evaluated.
    OtherEvent(EventKind),
    /// The event needs a rule that names this field to be allowed (a port
    /// other than 443, an uncommon DNS record type), and the rule's
    /// condition does not read it.
    GateNotNamed(Field),
}

/// A rule, as the engine holds it.
#[derive(Debug, Clone)]
pub struct RuleInfo {
    /// `<section>.<name>`
    pub name: String,
    /// Its section.
    pub section: crate::Section,
    /// What the rule says.
    pub decision: RuleDecision,
    /// Its priority.
    pub priority: u32,
    /// Its event.
    pub event: EventKind,
    /// Where it is written.
    pub location: Location,
    /// The layer of its profile.
    pub layer: Layer,
    /// Its condition, as written (`None`: always).
    pub condition: Option<String>,
    /// Its description, if any.
    pub description: Option<String>,
}

impl RuleInfo {
    pub(crate) fn new(rule: &Rule) -> RuleInfo {
        RuleInfo {
            name: rule.name.clone(),
            section: rule.section,
            decision: rule.decision,
            priority: rule.priority,
            event: rule.event,
            location: rule.location.clone(),
            layer: rule.layer,
            condition: rule.condition_text.clone(),
            description: rule.description.clone(),
        }
    }
}

/// One rule in an [`Explanation`], with what it made of the event.
#[derive(Debug, Clone)]
pub struct RuleTrace {
    /// The rule.
    pub rule: RuleInfo,
    /// What it made of the event.
    pub outcome: Outcome,
}

impl RuleTrace {
    /// Whether the rule took part as a match.
    fn counts(&self) -> bool {
        matches!(self.outcome, Outcome::Matched | Outcome::Failed { counts_as_match: true, .. })
    }
}

/// Why an event gets its verdict: see [`crate::Engine::explain`].
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The event.
    pub event: Event,
    /// The verdict, as [`crate::Engine::decide`] gives it.
    pub verdict: Verdict,
    /// Every rule: first the event's deciding rules in precedence order, then
    /// its rewrite rules in priority order, then the rules for other events.
    pub rules: Vec<RuleTrace>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "event: {}", self.event)?;
        let winner = self.verdict.rule.as_deref();
        match winner {
            None => writeln!(f, "decision: block (no rule matched; no match means block)")?,
            Some(rule) => {
                write!(f, "decision: {} by rule {rule}", self.verdict.decision)?;
                if let Some(trace) = self.rules.iter().find(|trace| trace.rule.name == rule) {
                    write!(f, " (priority {}, {})", trace.rule.priority, trace.rule.location)?;
                }
                writeln!(f)?;
                if let Some(mode) = self.verdict.mode {
                    writeln!(f, "  mode: {mode}")?;
                }
                if self.verdict.decision == Decision::Ask {
                    writeln!(f, "  the user is asked; no answer before the timeout blocks")?;
                }
            }
        }
        writeln!(f, "rules:")?;
        let winner_rule = winner.and_then(|rule| self.rules.iter().find(|trace| trace.rule.name == rule));
        for trace in &self.rules {
            let rule = &trace.rule;
            write!(
                f,
                "  {} [{} priority {}, {} layer, {}]: ",
                rule.name, rule.decision, rule.priority, rule.layer, rule.location
            )?;
            match &trace.outcome {
                Outcome::Matched => f.write_str("matched")?,
                Outcome::NotMatched => f.write_str("not matched: the condition is false")?,
                Outcome::Failed { error, counts_as_match: true } => {
                    write!(f, "matched: the condition failed ({error}), which counts as a match for block rules")?
                }
                Outcome::Failed { error, counts_as_match: false } => {
                    write!(f, "not matched: the condition failed ({error})")?
                }
                Outcome::OtherEvent(kind) => write!(f, "not evaluated: it is for {kind} events")?,
                Outcome::GateNotNamed(Field::HttpPort) => f.write_str(
                    "not matched: the request is not to port 443 and the condition does not name http.request.port",
                )?,
                Outcome::GateNotNamed(field) => {
                    write!(f, "not matched: the event needs a rule whose condition names {}", field.path())?
                }
            }
            if trace.counts() {
                match (rule.decision, winner_rule.map(|won| &won.rule)) {
                    (RuleDecision::Rewrite, _) if self.verdict.decision == Decision::Allow => {
                        f.write_str("; its actions apply (unless a rule with a lower priority number set the same header or answer)")?
                    }
                    (RuleDecision::Rewrite, _) => f.write_str("; its actions do not apply: the traffic is not allowed")?,
                    (_, Some(won)) if won.name == rule.name => f.write_str("; it decides")?,
                    (_, Some(won)) if won.priority == rule.priority => {
                        write!(f, "; outranked by {} (at equal priority block beats ask beats allow)", won.name)?
                    }
                    (_, Some(won)) => write!(f, "; outranked by {} (lower priority number)", won.name)?,
                    (_, None) => {}
                }
            }
            writeln!(f)?;
            if let Some(condition) = &rule.condition {
                writeln!(f, "      if {condition}")?;
            }
        }
        if self.rules.is_empty() {
            writeln!(f, "  (no rules)")?;
        }
        if self.verdict.actions.is_empty() {
            write!(f, "actions: none")
        } else {
            write!(f, "actions:")?;
            for action in &self.verdict.actions {
                write!(f, "\n  {action}")?;
            }
            Ok(())
        }
    }
}

/// What a set of loaded profiles holds: see [`crate::Engine::summary`].
#[derive(Debug, Clone)]
pub struct Summary {
    /// Each profile in load order: name, layer, description.
    pub profiles: Vec<(Arc<std::path::Path>, Layer, Option<String>)>,
    /// Each lock: section and where it is declared.
    pub locks: Vec<(crate::Section, Location)>,
    /// Each rule: by event kind, the deciding rules in precedence order, then
    /// the rewrite rules in priority order.
    pub rules: Vec<RuleInfo>,
}

impl Summary {
    pub(crate) fn new(inner: &Inner) -> Summary {
        let rules = EventKind::ALL
            .into_iter()
            .flat_map(|kind| inner.deciding(kind).chain(inner.rewriting(kind)))
            .map(RuleInfo::new)
            .collect();
        Summary {
            profiles: inner.profiles.iter().map(|p| (p.name.clone(), p.layer, p.description.clone())).collect(),
            locks: inner.locks.iter().map(|lock| (lock.section, lock.location.clone())).collect(),
            rules,
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |count: usize, noun: &str| {
            let plural = if count == 1 { "" } else { "s" };
            format!("{count} {noun}{plural}")
        };
        writeln!(f, "ok: {} from {}", count(self.rules.len(), "rule"), count(self.profiles.len(), "profile"))?;
        for (name, layer, description) in &self.profiles {
            write!(f, "profile {} ({layer} layer)", name.display())?;
            match description {
                Some(description) => writeln!(f, ": {description}")?,
                None => writeln!(f)?,
            }
        }
        for (section, location) in &self.locks {
            writeln!(f, "lock: section {section} (at {location}) takes only block rules from later profiles")?;
        }
        let mut kind = None;
        for rule in &self.rules {
            if kind != Some(rule.event) {
                writeln!(f, "{} rules, in precedence order:", rule.event)?;
                kind = Some(rule.event);
            }
            writeln!(f, "  {} [{} priority {}] {}", rule.name, rule.decision, rule.priority, rule.location)?;
        }
        write!(f, "anything no rule allows is blocked")
    }
}
