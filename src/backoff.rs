//! Exponential back-off with jitter, for every loop that retries a lost
//! connection or a failed write: the wait doubles up to a maximum, and each
//! wait adds up to half of itself again at random, so instances that failed
//! together do not retry together.

use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;

/// How long to wait now: `backoff` plus up to half of it again. Doubles
/// `backoff` up to `max` for the next time.
pub fn next(backoff: &mut Duration, max: Duration) -> Duration {
    let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
    let wait = *backoff + Duration::from_millis(jitter);
    *backoff = (*backoff * 2).min(max);
    wait
}

/// Sleeps the wait `next` gives. True when shutdown came first (or was
/// already set when the wait ended).
pub async fn sleep(backoff: &mut Duration, max: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    let wait = next(backoff, max);
    tokio::select! {
        _ = tokio::time::sleep(wait) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_up_to_half_again_and_doubles_up_to_the_maximum() {
        let mut backoff = Duration::from_millis(200);
        let wait = next(&mut backoff, Duration::from_millis(500));
        assert!((200..=300).contains(&wait.as_millis()), "{wait:?}");
        assert_eq!(backoff, Duration::from_millis(400));
        next(&mut backoff, Duration::from_millis(500));
        assert_eq!(backoff, Duration::from_millis(500));
    }
}
