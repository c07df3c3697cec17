//! Readiness checks: what `/readyz` reports.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;

/// Whether a failing check makes the process unready (503) or only degraded (200 with a
/// warning): the API still takes writes without NATS, because its outbox holds the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Critical,
    Degrading,
}

type CheckFn = dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync;

struct Check {
    name: String,
    severity: Severity,
    run: Arc<CheckFn>,
}

/// The set of readiness checks of one process.
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<std::sync::RwLock<Vec<Arc<Check>>>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub name: String,
    pub severity: Severity,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `ready`, `degraded` or `unready`.
    pub status: &'static str,
    pub checks: Vec<CheckReport>,
}

impl Report {
    pub fn is_ready(&self) -> bool {
        self.status != "unready"
    }
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the check `name`, in place of an earlier check of that name.
    pub fn add<F, Fut>(&self, name: impl Into<String>, severity: Severity, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let run: Arc<CheckFn> = Arc::new(move || Box::pin(check()));
        let name = name.into();
        let mut checks = self.checks.write().expect("health lock");
        checks.retain(|c| c.name != name);
        checks.push(Arc::new(Check { name, severity, run }));
    }

    /// Runs every check concurrently, each bounded by `timeout`.
    ///
    /// Every check is started (its closure called, which is where a check of in-process state
    /// reads it) under the lock that [`Self::add`] takes, so a report is of one moment: state
    /// changed after adding a check (the host marks the processors installed once their groups'
    /// checks are added) is never seen without that check.
    pub async fn report(&self, timeout: Duration) -> Report {
        let (checks, started): (Vec<Arc<Check>>, Vec<_>) = {
            let checks = self.checks.read().expect("health lock");
            checks.iter().map(|c| (c.clone(), (c.run)())).unzip()
        };
        let results = futures::future::join_all(started.into_iter().map(|check| async move {
            match tokio::time::timeout(timeout, check).await {
                Ok(r) => r,
                Err(_) => Err(format!("timed out after {timeout:?}")),
            }
        }))
        .await;
        let mut status = "ready";
        let mut reports = Vec::with_capacity(checks.len());
        for (check, result) in checks.iter().zip(results) {
            let ok = result.is_ok();
            if !ok {
                status = match (check.severity, status) {
                    (Severity::Critical, _) | (_, "unready") => "unready",
                    (Severity::Degrading, _) => "degraded",
                };
            }
            reports.push(CheckReport { name: check.name.clone(), severity: check.severity, ok, error: result.err() });
        }
        Report { status, checks: reports }
    }
}

/// A check that the database answers.
pub fn database_check(pool: sqlx::PgPool) -> impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync {
    move || {
        let pool = pool.clone();
        Box::pin(async move { sqlx::query("SELECT 1").execute(&pool).await.map(drop).map_err(|e| e.to_string()) })
    }
}

/// A check that JetStream serves `stream`: the server answers for it and, on a cluster, the
/// stream has an elected leader. On a cluster that lost its quorum the client stays connected to
/// a surviving node (the `nats` check passes) while no publish to the stream can succeed.
pub fn stream_check(
    js: async_nats::jetstream::Context,
    stream: String,
) -> impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync {
    move || {
        let (js, stream) = (js.clone(), stream.clone());
        Box::pin(async move {
            let found = js.get_stream(&stream).await.map_err(|e| format!("stream {stream}: {e}"))?;
            match &found.cached_info().cluster {
                Some(cluster) if cluster.leader.as_deref().is_none_or(str::is_empty) => {
                    Err(format!("stream {stream} has no leader: its JetStream cluster has lost its quorum"))
                }
                _ => Ok(()),
            }
        })
    }
}

/// A check that the NATS connection is up.
pub fn nats_check(client: async_nats::Client) -> impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync {
    move || {
        let state = client.connection_state();
        Box::pin(async move {
            match state {
                async_nats::connection::State::Connected => Ok(()),
                other => Err(format!("NATS connection is {other}")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// The host adds a group's check, then marks the processors installed. A report that ran
    /// between the two reading the list before and the mark after would say ready while the group
    /// is not bound. Here the first check, when started, has another thread do both and waits
    /// (up to a bound) for it to finish.
    #[tokio::test]
    async fn a_report_never_sees_the_processors_installed_without_the_checks_they_added() {
        let health = Health::new();
        let installed = Arc::new(AtomicBool::new(false));
        let installer = Arc::new(Mutex::new(None));
        let (h, done, thread) = (health.clone(), installed.clone(), installer.clone());
        health.add("first", Severity::Critical, move || {
            let (h, done) = (h.clone(), done.clone());
            let (finished, finish) = std::sync::mpsc::channel();
            *thread.lock().unwrap() = Some(std::thread::spawn(move || {
                h.add("consumer probe", Severity::Critical, || async { Err("not bound yet".to_owned()) });
                done.store(true, Ordering::Release);
                let _ = finished.send(());
            }));
            let _ = finish.recv_timeout(Duration::from_millis(200));
            async { Ok(()) }
        });
        let done = installed.clone();
        health.add("processors", Severity::Critical, move || {
            let done = done.load(Ordering::Acquire);
            async move { if done { Ok(()) } else { Err("installing the processors".to_owned()) } }
        });

        let first = health.report(Duration::from_secs(1)).await;
        let names: Vec<_> = first.checks.iter().map(|c| (c.name.as_str(), c.ok)).collect();
        assert_eq!(first.status, "unready", "{names:?}");
        assert_eq!(names, [("first", true), ("processors", false)]);

        let taken = installer.lock().unwrap().take();
        taken.expect("the installing thread").join().unwrap();
        assert!(installed.load(Ordering::Acquire));
        health.checks.write().unwrap().retain(|c| c.name != "first");
        let then = health.report(Duration::from_secs(1)).await;
        let names: Vec<_> = then.checks.iter().map(|c| (c.name.as_str(), c.ok)).collect();
        assert_eq!(then.status, "unready");
        assert_eq!(names, [("processors", true), ("consumer probe", false)]);
    }
}
