//! What a scenario saw: named figures, checks that passed or failed, and a line saying what
//! ran. The CI tests assert on the checks; the `reliability` example renders every report
//! into the results table of `docs/reliability.md`.

use std::fmt::Write as _;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: String,
    /// What ran, in one sentence (sizes, rates, durations, settings that matter).
    pub ran: String,
    pub figures: Vec<(String, String)>,
    pub checks: Vec<Check>,
    /// Why the scenario did not run, when it did not.
    pub skipped: Option<String>,
    pub elapsed: Duration,
}

impl Report {
    pub fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.to_string(),
            ran: String::new(),
            figures: Vec::new(),
            checks: Vec::new(),
            skipped: None,
            elapsed: Duration::ZERO,
        }
    }

    pub fn figure(&mut self, name: &str, value: impl ToString) {
        self.figures.push((name.to_string(), value.to_string()));
    }

    pub fn check(&mut self, name: &str, passed: bool, detail: impl ToString) {
        self.checks.push(Check {
            name: name.to_string(),
            passed,
            detail: detail.to_string(),
        });
    }

    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// One block of text for the test output.
    pub fn text(&self) -> String {
        let mut out = format!(
            "== {} ({:.1} s)\n",
            self.scenario,
            self.elapsed.as_secs_f64()
        );
        if let Some(reason) = &self.skipped {
            let _ = writeln!(out, "   SKIPPED: {reason}");
        }
        if !self.ran.is_empty() {
            let _ = writeln!(out, "   ran: {}", self.ran);
        }
        for (name, value) in &self.figures {
            let _ = writeln!(out, "   {name}: {value}");
        }
        for check in &self.checks {
            let mark = if check.passed { "ok  " } else { "FAIL" };
            let _ = writeln!(out, "   [{mark}] {}: {}", check.name, check.detail);
        }
        out
    }

    /// Prints the report and panics if a check failed.
    pub fn assert_passed(&self) {
        eprintln!("{}", self.text());
        let failed: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        assert!(
            failed.is_empty(),
            "{}: failed checks: {failed:#?}",
            self.scenario
        );
    }

    /// A row of the results table: scenario | what ran | figures | checks.
    pub fn markdown_row(&self) -> String {
        let escape = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        let figures = if let Some(reason) = &self.skipped {
            format!("skipped: {}", escape(reason))
        } else {
            self.figures
                .iter()
                .map(|(k, v)| format!("{}: {}", escape(k), escape(v)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let checks = if self.checks.is_empty() {
            "—".to_string()
        } else {
            self.checks
                .iter()
                .map(|c| format!("{} {}", if c.passed { "✅" } else { "❌" }, escape(&c.name)))
                .collect::<Vec<_>>()
                .join("<br>")
        };
        format!(
            "| {} | {} ({:.0} s) | {} | {} |",
            escape(&self.scenario),
            escape(&self.ran),
            self.elapsed.as_secs_f64(),
            figures,
            checks
        )
    }
}

/// A duration as seconds with one decimal, or milliseconds below one second.
pub fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// A fraction as a percentage with up to three decimals.
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "0 %".into();
    }
    format!("{:.3} %", part as f64 * 100.0 / whole as f64)
}
