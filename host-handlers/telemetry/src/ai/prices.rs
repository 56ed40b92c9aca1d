//! The price table behind `estimated_cost_usd`.
//!
//! A TOML file of `[models."<name>"]` tables with USD prices per million
//! tokens (`input`, `output`, optional `cache_read`, `cache_write`). The
//! crate ships one (`prices.toml`, [`PriceTable::builtin`]); users point
//! [`PriceTable::load`] at their own copy when prices change.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::ModelCall;
use crate::TelemetryError;

const BUILTIN: &str = include_str!("../../prices.toml");

/// Prices of one model in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input: f64,
    pub output: f64,
    /// Input tokens read from a prompt cache; `input` when absent.
    pub cache_read: Option<f64>,
    /// Input tokens written to a prompt cache; `input` when absent.
    pub cache_write: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    #[serde(default)]
    models: BTreeMap<String, ModelPrice>,
}

/// Model prices by model name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable {
    models: BTreeMap<String, ModelPrice>,
}

impl PriceTable {
    /// The table shipped with this crate.
    pub fn builtin() -> PriceTable {
        match PriceTable::parse(BUILTIN, "built-in prices.toml") {
            Ok(table) => table,
            Err(e) => {
                // Covered by a unit test; never expected at run time.
                tracing::error!(error = %e, "built-in price table does not parse; costs will not be estimated");
                PriceTable::default()
            }
        }
    }

    /// Read a price table from a TOML file.
    pub fn load(path: &Path) -> Result<PriceTable, TelemetryError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TelemetryError::Prices { origin: path.display().to_string(), reason: e.to_string() })?;
        PriceTable::parse(&text, &path.display().to_string())
    }

    /// Parse a price table; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<PriceTable, TelemetryError> {
        let err = |reason: String| TelemetryError::Prices { origin: origin.to_owned(), reason };
        let file: PriceFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        for (name, price) in &file.models {
            let all = [Some(price.input), Some(price.output), price.cache_read, price.cache_write];
            if all.iter().flatten().any(|p| !p.is_finite() || *p < 0.0) {
                return Err(err(format!("model {name:?}: prices must be finite and not negative")));
            }
        }
        Ok(PriceTable { models: file.models })
    }

    /// The price of `model`: its exact entry, or else the longest entry it
    /// extends with a `-` suffix (dated snapshots such as `gpt-4o-2024-08-06`).
    /// A resource prefix such as `models/` is ignored.
    pub fn lookup(&self, model: &str) -> Option<&ModelPrice> {
        let model = model.rsplit('/').next().unwrap_or(model);
        if let Some(price) = self.models.get(model) {
            return Some(price);
        }
        self.models
            .iter()
            .filter(|(name, _)| model.strip_prefix(name.as_str()).is_some_and(|rest| rest.starts_with('-')))
            .max_by_key(|(name, _)| name.len())
            .map(|(_, price)| price)
    }

    /// The estimated cost of `call` in USD, if its model has a price and any
    /// token count is known.
    pub fn estimate(&self, call: &ModelCall) -> Option<f64> {
        let price = self.lookup(call.model.as_deref()?)?;
        let counts = [call.input_tokens, call.output_tokens, call.cache_read_tokens, call.cache_write_tokens];
        if counts.iter().all(Option::is_none) {
            return None;
        }
        let tokens = |n: Option<u64>| n.unwrap_or(0) as f64;
        let cost = tokens(call.input_tokens) * price.input
            + tokens(call.output_tokens) * price.output
            + tokens(call.cache_read_tokens) * price.cache_read.unwrap_or(price.input)
            + tokens(call.cache_write_tokens) * price.cache_write.unwrap_or(price.input);
        Some(cost / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(model: &str, input: u64, output: u64) -> ModelCall {
        ModelCall {
            provider: "test".into(),
            model: Some(model.into()),
            input_tokens: Some(input),
            output_tokens: Some(output),
            ..ModelCall::default()
        }
    }

    #[test]
    fn builtin_table_parses_and_prices_known_models() {
        let table = PriceTable::parse(BUILTIN, "builtin").unwrap();
        assert_eq!(table, PriceTable::builtin());
        assert!(table.lookup("claude-sonnet-4-5-20250929").is_some());
        assert!(table.lookup("gpt-4o-2024-08-06").is_some());
        assert!(table.lookup("models/gemini-2.5-flash").is_some());
    }

    #[test]
    fn longest_matching_name_wins_and_prefixes_need_a_dash() {
        let table = PriceTable::parse(
            "[models.gpt-4o]\ninput = 2.5\noutput = 10.0\n[models.gpt-4o-mini]\ninput = 0.15\noutput = 0.6\n",
            "t",
        )
        .unwrap();
        assert_eq!(table.lookup("gpt-4o-mini-2024-07-18").map(|p| p.input), Some(0.15));
        assert_eq!(table.lookup("gpt-4o-2024-08-06").map(|p| p.input), Some(2.5));
        assert_eq!(table.lookup("gpt-4"), None);
        assert_eq!(table.lookup("gpt-4omega"), None);
    }

    #[test]
    fn cost_uses_all_token_kinds() {
        let table = PriceTable::parse(
            "[models.m]\ninput = 3.0\noutput = 15.0\ncache_read = 0.3\ncache_write = 3.75\n\
             [models.n]\ninput = 1.0\noutput = 2.0\n",
            "t",
        )
        .unwrap();
        let mut c = call("m", 1_000_000, 100_000);
        c.cache_read_tokens = Some(2_000_000);
        c.cache_write_tokens = Some(1_000);
        let cost = table.estimate(&c).unwrap();
        assert!((cost - (3.0 + 1.5 + 0.6 + 0.00375)).abs() < 1e-9, "{cost}");
        let mut n = call("n", 0, 0);
        n.input_tokens = None;
        n.cache_read_tokens = Some(500_000);
        assert!((table.estimate(&n).unwrap() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn unknown_models_and_missing_tokens_have_no_cost() {
        let table = PriceTable::builtin();
        assert_eq!(table.estimate(&call("some-new-model", 10, 10)), None);
        let mut c = call("gpt-4o", 0, 0);
        c.input_tokens = None;
        c.output_tokens = None;
        assert_eq!(table.estimate(&c), None);
        c.model = None;
        assert_eq!(table.estimate(&c), None);
    }

    #[test]
    fn bad_tables_are_rejected_with_the_reason() {
        let err = PriceTable::parse("[models.x]\ninput = -1.0\noutput = 1.0\n", "user.toml").unwrap_err();
        assert!(err.to_string().contains("user.toml") && err.to_string().contains("\"x\""), "{err}");
        assert!(PriceTable::parse("[models.x]\ninput = 1.0\n", "t").is_err());
        assert!(PriceTable::parse("[models.x]\ninput = 1.0\noutput = 1.0\nextra = 2\n", "t").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prices.toml");
        assert!(PriceTable::load(&path).is_err());
        std::fs::write(&path, "[models.y]\ninput = 1.0\noutput = 4.0\n").unwrap();
        assert!(PriceTable::load(&path).unwrap().lookup("y").is_some());
    }
}
