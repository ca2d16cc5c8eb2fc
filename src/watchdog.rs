//! The lost-completion watchdog (SPEC section 12). `POST /v1/invocations`
//! journals a started invocation with a deadline; this task looks for
//! deadlines that passed and, for each call whose completion never came,
//! journals the failure record fnrelay makes itself (status 504,
//! `FunctionInvokeTimeout`), delivered and counted like any other. A
//! completion that came first left its record, so the watchdog finds it and
//! makes nothing; one that comes later gets the watchdog record's id back.
//! Deadlines live in the journal: they survive restarts, and on PostgreSQL
//! one replica fires each (a claim held for a lease).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::journal::{Watch, ms_to_rfc3339, now_ms};
use crate::logging::{RateLimited, clip};
use crate::record::Completion;

/// Watches fired per journal round at most.
const BATCH: usize = 256;
/// How long one replica holds a due watch it is firing.
const LEASE: Duration = Duration::from_secs(30);

/// The completion the watchdog stands in for: status 504,
/// `FunctionInvokeTimeout`, an error message naming the missed deadline.
pub fn timeout_event(
    fn_call_id: &str,
    function_id: &str,
    application_id: &str,
    compartment_id: &str,
    opc_request_id: Option<String>,
    deadline_ms: i64,
) -> Completion {
    Completion {
        fn_call_id: fn_call_id.to_string(),
        function_id: function_id.to_string(),
        application_id: application_id.to_string(),
        compartment_id: compartment_id.to_string(),
        opc_request_id,
        status: 504,
        error_code: Some("FunctionInvokeTimeout".into()),
        error_message: Some(format!(
            "no completion arrived by the invocation's deadline {} (POST /v1/invocations); this failure record was made by fnrelay's watchdog",
            ms_to_rfc3339(deadline_ms)
        )),
        timestamp: time::OffsetDateTime::from_unix_timestamp_nanos(deadline_ms as i128 * 1_000_000)
            .ok(),
        success: None,
        failure: None,
    }
}

/// Fires due watches until `stop`.
pub async fn run(state: Arc<AppState>, stop: CancellationToken) {
    let errors = RateLimited::new(Duration::from_secs(10));
    loop {
        match state.journal.due_watches(now_ms(), BATCH, LEASE).await {
            Ok(due) if !due.is_empty() => {
                let full = due.len() == BATCH;
                if let Err(e) = fire(&state, due).await {
                    let text = e.to_string();
                    if let Some(suppressed) = errors.allow(&text) {
                        tracing::error!(error = %text, suppressed, "watchdog: cannot journal the records of missed deadlines; retrying");
                    }
                } else if full {
                    continue;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let text = e.to_string();
                if let Some(suppressed) = errors.allow(&text) {
                    tracing::error!(error = %text, suppressed, "watchdog: cannot read deadlines from the journal; retrying");
                }
            }
        }
        let poll = state.config().watchdog.poll_interval;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(poll) => {}
            _ = state.watchdog_wake.notified() => {}
        }
    }
}

async fn fire(state: &AppState, due: Vec<Watch>) -> Result<(), crate::journal::JournalError> {
    let events: Vec<Completion> = due
        .iter()
        .map(|w| {
            timeout_event(
                &w.fn_call_id,
                &w.function_id,
                &w.application_id,
                &w.compartment_id,
                w.opc_request_id.clone(),
                w.deadline_ms,
            )
        })
        .collect();
    let made = crate::api::journal_made_records(state, events).await?;
    for (w, made) in due.iter().zip(&made) {
        let result = match made {
            Some(a) if !a.existing => {
                tracing::warn!(
                    fn_call_id = %clip(&w.fn_call_id),
                    record_id = %a.id,
                    deadline = %ms_to_rfc3339(w.deadline_ms),
                    "watchdog: no completion by the deadline; failure record made"
                );
                "fired"
            }
            Some(_) => "completed",
            None => "refused",
        };
        state.metrics.watchdog(result);
    }
    state
        .journal
        .unwatch(due.into_iter().map(|w| w.fn_call_id).collect())
        .await
}
