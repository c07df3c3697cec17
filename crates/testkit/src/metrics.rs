//! Reading a Prometheus `/metrics` text.

use std::collections::BTreeSet;

/// The value of one series, named in full as Prometheus prints it (`name` or
/// `name{label="value",…}`), if the text has it.
pub fn series(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The sum of the series of metric `name` whose labels include every one of `labels` (each
/// `key="value"`); 0 when there is none.
pub fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (set, value) = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let set: Vec<&str> = set.split(',').collect();
            labels.iter().all(|l| set.contains(l)).then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// The metric names of a scrape (histograms as `_bucket`, `_sum` and `_count`).
pub fn names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE a counter\na 3\na_total{k=\"x\",o=\"ok\"} 2\na_total{k=\"y\",o=\"ok\"} 5\na_total{k=\"y\",o=\"no\"} 7\n";

    #[test]
    fn series_finds_a_whole_series_and_no_prefix_of_another() {
        assert_eq!(series(TEXT, "a"), Some(3.0));
        assert_eq!(series(TEXT, "a_total{k=\"x\",o=\"ok\"}"), Some(2.0));
        assert_eq!(series(TEXT, "a_tot"), None);
    }

    #[test]
    fn sum_adds_the_series_with_every_label_asked_for() {
        assert_eq!(sum(TEXT, "a_total", &["o=\"ok\""]), 7.0);
        assert_eq!(sum(TEXT, "a_total", &["k=\"y\"", "o=\"no\""]), 7.0);
        assert_eq!(sum(TEXT, "a_total", &["k=\"z\""]), 0.0);
    }

    #[test]
    fn names_lists_each_metric_once() {
        assert_eq!(names(TEXT).into_iter().collect::<Vec<_>>(), ["a", "a_total"]);
    }
}
