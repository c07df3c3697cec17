//! Waiting for a condition with a deadline: the one way the tests wait for something another
//! process or task makes true.

use std::future::Future;
use std::time::Duration;

/// How often [`eventually`] checks.
pub const PACE: Duration = Duration::from_millis(25);

/// Checks `check` every [`PACE`] until it yields a value and returns it; panics, naming `what`,
/// once `within` has passed without one.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pace = tokio::time::interval(PACE);
    loop {
        pace.tick().await;
        if let Some(found) = check().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
    }
}

/// [`eventually`] for a check that says why its condition does not hold yet: checks `check`
/// every [`PACE`] until it yields `Ok` and returns the value; panics, naming `what` and the last
/// reason, once `within` has passed without one.
pub async fn eventually_ok<T, F, Fut>(what: &str, within: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    match within_deadline(within, check).await {
        Ok(found) => found,
        Err(why) => panic!("timed out after {within:?} waiting for {what}: {why}"),
    }
}

/// [`eventually_ok`] that gives up instead of panicking: checks `check` every [`PACE`] until it
/// yields `Ok` and returns the value, or the last reason once `within` has passed without one.
pub async fn within_deadline<T, F, Fut>(within: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut pace = tokio::time::interval(PACE);
    loop {
        pace.tick().await;
        match check().await {
            Ok(found) => return Ok(found),
            Err(why) if tokio::time::Instant::now() >= deadline => return Err(why),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_returns_the_first_value_the_check_yields() {
        let mut calls = 0;
        let found = eventually("the third call", Duration::from_secs(5), || {
            calls += 1;
            let now = calls;
            async move { (now == 3).then_some(now) }
        })
        .await;
        assert_eq!(found, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after 100ms waiting for nothing")]
    async fn eventually_panics_with_what_it_waited_for() {
        eventually("nothing", Duration::from_millis(100), || async { None::<()> }).await;
    }

    #[tokio::test]
    async fn within_deadline_returns_the_last_reason_once_the_time_is_up() {
        let mut calls = 0;
        let given_up = within_deadline(Duration::from_millis(100), || {
            calls += 1;
            let now = calls;
            async move { Err::<(), _>(format!("call {now}")) }
        })
        .await;
        assert_eq!(given_up, Err(format!("call {calls}")));
        assert!(calls > 1, "checked once only");
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after 100ms waiting for nothing: still 3 behind")]
    async fn eventually_ok_panics_with_the_last_reason() {
        eventually_ok("nothing", Duration::from_millis(100), || async { Err::<(), _>("still 3 behind".to_owned()) })
            .await;
    }
}
