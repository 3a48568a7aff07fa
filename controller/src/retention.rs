//! Retention: raw drift summaries are kept for `retention_raw_days`, their hourly
//! aggregates for `retention_hourly_days`; a pass runs at start and then every hour. Every
//! minute the hourly aggregates ingest folded in memory are written (`Store::flush_hourly`),
//! so that the database's own copy is never far behind.

use std::sync::Arc;
use std::time::Duration;

use edgeloop_agent::now_ms;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::Store;

const EVERY: Duration = Duration::from_secs(3600);
const FLUSH_EVERY: Duration = Duration::from_secs(60);
const DAY_MS: u64 = 86_400_000;

pub struct Retention {
    pub store: Arc<dyn Store>,
    /// 0: keep forever.
    pub raw_days: u64,
    /// 0: keep forever.
    pub hourly_days: u64,
}

/// The cutoff `days` before `now_ms`; 0 (nothing is older) when `days` is 0.
fn cutoff(now_ms: u64, days: u64) -> u64 {
    if days == 0 {
        0
    } else {
        now_ms.saturating_sub(days.saturating_mul(DAY_MS))
    }
}

impl Retention {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(EVERY);
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // Spares the next start folding them again from the raw summaries.
                    if let Err(e) = self.store.flush_hourly().await {
                        warn!(error = %e, "cannot write hourly aggregates at shutdown");
                    }
                    break;
                }
                _ = flush.tick() => {
                    if let Err(e) = self.store.flush_hourly().await {
                        warn!(error = %e, "cannot write hourly aggregates; trying again in a minute");
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            let now = now_ms();
            match self
                .store
                .prune(cutoff(now, self.raw_days), cutoff(now, self.hourly_days))
                .await
            {
                Ok(p) if p.telemetry + p.hourly > 0 => info!(
                    telemetry = p.telemetry,
                    hourly = p.hourly,
                    seen_messages = p.seen_messages,
                    "retention pass"
                ),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "retention pass failed; trying again in an hour"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_days_keeps_everything() {
        assert_eq!(cutoff(10 * DAY_MS, 0), 0);
        assert_eq!(cutoff(10 * DAY_MS, 3), 7 * DAY_MS);
        assert_eq!(cutoff(DAY_MS, 3), 0);
    }
}
