//! What every benchmark prints: latency histograms, a human-readable table,
//! and the final JSON line that scripts read.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::Value;

/// Latencies in microseconds, from 0 to an hour, 3 significant digits.
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Self {
        Self { histogram: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds") }
    }

    /// Records one latency; values out of range are clamped.
    pub fn record_us(&mut self, us: u64) {
        self.histogram.saturating_record(us);
    }

    pub fn add(&mut self, other: &Latencies) {
        self.histogram.add(&other.histogram).expect("histograms with the same bounds");
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The `q` quantile (0..=1) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.histogram.max() as f64 / 1000.0
    }

    /// `p50 / p95 / p99 / max` in ms, for a table cell.
    pub fn summary(&self) -> String {
        format!(
            "p50 {:.2} / p95 {:.2} / p99 {:.2} / max {:.2} ms (n={})",
            self.quantile_ms(0.50),
            self.quantile_ms(0.95),
            self.quantile_ms(0.99),
            self.max_ms(),
            self.count()
        )
    }
}

/// A titled two-column table, printed with aligned labels.
pub struct Table {
    title: String,
    rows: Vec<(String, String)>,
}

impl Table {
    pub fn new(title: impl Into<String>) -> Self {
        Self { title: title.into(), rows: Vec::new() }
    }

    pub fn row(&mut self, label: impl Into<String>, value: impl ToString) -> &mut Self {
        self.rows.push((label.into(), value.to_string()));
        self
    }

    pub fn render(&self) -> String {
        let width = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let mut out = String::new();
        let _ = writeln!(out, "== {} ==", self.title);
        for (label, value) in &self.rows {
            let _ = writeln!(out, "  {label:<width$}  {value}");
        }
        out
    }
}

/// The fields of the final JSON line, in the order they were set (a key set
/// twice keeps its first place and its last value).
#[derive(Default)]
pub struct JsonLine {
    fields: Vec<(String, Value)>,
}

impl JsonLine {
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        let (key, value) = (key.into(), value.into());
        match self.fields.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.fields.push((key, value)),
        }
        self
    }

    /// A float rounded to `digits` decimals (keeps the line readable).
    pub fn set_f64(&mut self, key: impl Into<String>, value: f64, digits: i32) -> &mut Self {
        let scale = 10f64.powi(digits);
        self.set(key, (value * scale).round() / scale)
    }

    /// One line of JSON, no trailing newline.
    pub fn render(&self) -> String {
        let fields: Vec<String> =
            self.fields.iter().map(|(k, v)| format!("{}:{v}", Value::String(k.clone()))).collect();
        format!("{{{}}}", fields.join(","))
    }
}

/// Cores the machine offers this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_in_milliseconds() {
        let mut l = Latencies::new();
        for us in 1..=1000 {
            l.record_us(us * 10);
        }
        l.record_us(0);
        assert_eq!(l.count(), 1001);
        assert!((l.quantile_ms(0.5) - 5.0).abs() < 0.01, "{}", l.quantile_ms(0.5));
        assert!((l.max_ms() - 10.0).abs() < 0.01);
        assert_eq!(Latencies::new().quantile_ms(0.99), 0.0);
    }

    #[test]
    fn json_line_rounds_and_keeps_order() {
        let mut j = JsonLine::default();
        j.set_f64("p99_ms", 1.23456, 3).set("commits", 10u64).set("name", "a\"b").set("commits", 11u64);
        let line = j.render();
        assert_eq!(line, r#"{"p99_ms":1.235,"commits":11,"name":"a\"b"}"#);
        assert!(serde_json::from_str::<Value>(&line).is_ok());
    }

    #[test]
    fn table_aligns_labels() {
        let mut t = Table::new("x");
        t.row("a", 1).row("long label", "v");
        assert_eq!(t.render(), "== x ==\n  a           1\n  long label  v\n");
    }
}
