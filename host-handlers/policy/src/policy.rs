//! Resolving `ask`: a [`Policy`] is an [`Engine`] plus who answers its
//! questions and how long to wait.
//!
//! When the engine says ask, the policy asks its [`Asker`] (the CLI asks on
//! the terminal; platforms pass their own). Yes allows the event, with the
//! rewrite actions that apply to it; no blocks it; no asker, or no answer
//! before the timeout, blocks it. Answers are remembered for the policy's
//! lifetime (one policy per sandbox), keyed by the asking rule and the
//! event as the question shows it ([`Event::describe`]: method, host, port,
//! path and query of a request; type and name of a query), so the same
//! question is not asked twice and a yes never covers anything that was not
//! shown; timeouts are not remembered. Questions
//! are asked one at a time, and the timeout covers waiting for the previous
//! question too.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::Engine;
use crate::event::Event;
use crate::{Decision, Verdict};

/// How long a question waits for an answer by default.
pub const DEFAULT_ASK_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers `ask` decisions (the CLI asks on the terminal; platforms pass their own).
pub trait Asker: Send + Sync + std::fmt::Debug {
    /// `true` allows. The caller applies the timeout.
    fn ask(&self, event: &Event, rule: Option<&str>) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

/// What an answer is remembered by: the asking rule and the event as shown.
type AnswerKey = (String, String);

#[derive(Debug)]
struct Asking {
    asker: Arc<dyn Asker>,
    timeout: Duration,
    answers: Mutex<HashMap<AnswerKey, bool>>,
    /// Serialises questions.
    turn: tokio::sync::Mutex<()>,
}

/// An [`Engine`] plus how `ask` is resolved: the only thing handlers call.
/// Clones share remembered answers.
#[derive(Debug, Clone)]
pub struct Policy {
    engine: Engine,
    asking: Option<Arc<Asking>>,
    remember: bool,
}

impl Policy {
    /// A policy without an asker: `ask` blocks.
    pub fn new(engine: Engine) -> Self {
        Self { engine, asking: None, remember: true }
    }

    /// A policy that asks `asker`, waiting at most `timeout` for an answer;
    /// answers are remembered.
    pub fn with_asker(engine: Engine, asker: Arc<dyn Asker>, timeout: Duration) -> Self {
        let asking = Asking { asker, timeout, answers: Mutex::new(HashMap::new()), turn: tokio::sync::Mutex::new(()) };
        Self { engine, asking: Some(Arc::new(asking)), remember: true }
    }

    /// Whether answers are remembered and reused (the default) or every
    /// event is asked about.
    pub fn remember_answers(mut self, remember: bool) -> Self {
        self.remember = remember;
        self
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Decide, resolving `ask` through the asker (timeout: block). The returned
    /// decision is never [`Decision::Ask`].
    pub async fn decide(&self, event: &Event) -> Verdict {
        let verdict = self.engine.decide(event);
        if verdict.decision != Decision::Ask {
            return verdict;
        }
        let rule = verdict.rule.clone();
        let Some(asking) = &self.asking else {
            tracing::info!(rule = rule.as_deref(), event = %event, "ask without an asker: blocked");
            return self.resolved(event, verdict, false);
        };
        let key = (rule.clone().unwrap_or_default(), event.describe());
        if let Some(allowed) = self.remembered(asking, &key) {
            return self.resolved(event, verdict, allowed);
        }
        let answer = tokio::time::timeout(asking.timeout, async {
            let _turn = asking.turn.lock().await;
            // Someone may have answered the same question while we waited.
            if let Some(allowed) = self.remembered(asking, &key) {
                return allowed;
            }
            let allowed = asking.asker.ask(event, rule.as_deref()).await;
            if self.remember {
                if let Ok(mut answers) = asking.answers.lock() {
                    answers.insert(key.clone(), allowed);
                }
            }
            allowed
        })
        .await;
        let allowed = match answer {
            Ok(allowed) => {
                tracing::info!(rule = rule.as_deref(), event = %event, allowed, "ask answered");
                allowed
            }
            Err(_) => {
                tracing::info!(rule = rule.as_deref(), event = %event, "ask timed out: blocked");
                false
            }
        };
        self.resolved(event, verdict, allowed)
    }

    /// The verdict after an `ask`: allowed (with the asking rule's connect
    /// mode, for `tcp.connect`) or blocked.
    fn resolved(&self, event: &Event, asked: Verdict, allowed: bool) -> Verdict {
        if allowed {
            Verdict {
                decision: Decision::Allow,
                rule: asked.rule,
                actions: self.engine.actions(event),
                mode: asked.mode,
            }
        } else {
            Verdict { decision: Decision::Block, rule: asked.rule, actions: Vec::new(), mode: None }
        }
    }

    fn remembered(&self, asking: &Asking, key: &AnswerKey) -> Option<bool> {
        if !self.remember {
            return None;
        }
        asking.answers.lock().ok().and_then(|answers| answers.get(key).copied())
    }
}
