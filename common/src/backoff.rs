//! Exponential backoff with jitter, pure: the caller supplies the randomness,
//! so tests and simulations are deterministic.

use std::time::Duration;

/// The delay after the `failures`-th failure in a row (1 for the first):
/// `initial`, doubling per failure up to `max`. The one exponential backoff
/// of the project; `Backoff` adds jitter to it.
pub fn exponential(initial: Duration, max: Duration, failures: u32) -> Duration {
    initial
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(max)
}

/// Delays grow from `initial` doubling up to `max`; each delay is drawn from
/// the upper half of its step ("equal jitter"), so a fleet of agents that lost
/// the coordinator at the same moment does not come back in lockstep, while
/// no agent waits less than half the step.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial: initial.max(Duration::from_millis(1)),
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The delay before the next try; `random` is any uniformly drawn `u64`.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let step = exponential(self.initial, self.max, self.failures);
        let half = step / 2;
        let half_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(random % (half_ms + 1))
    }

    /// Called after a success: the next failure starts from `initial` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn exponential_doubles_from_the_first_failure_up_to_the_cap() {
        let steps: Vec<u64> = (0..8)
            .map(|n| exponential(Duration::from_secs(2), Duration::from_secs(60), n).as_secs())
            .collect();
        assert_eq!(steps, vec![2, 2, 4, 8, 16, 32, 60, 60]);
        let far = exponential(Duration::from_secs(1), Duration::from_secs(600), u32::MAX);
        assert_eq!(far, Duration::from_secs(600));
    }

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        // random = u64::MAX % (half+1) gives values inside the upper half.
        let steps: Vec<u128> = (0..6).map(|_| b.next_delay(0).as_millis()).collect();
        assert_eq!(steps, vec![50, 100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(0), Duration::from_millis(50));
    }

    proptest! {
        #[test]
        fn delay_stays_within_half_step_and_step(randoms in prop::collection::vec(any::<u64>(), 1..40)) {
            let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(5000));
            for (i, r) in randoms.into_iter().enumerate() {
                let step = (10u64 << i.min(20)).min(5000);
                let d = u64::try_from(b.next_delay(r).as_millis()).unwrap_or(u64::MAX);
                prop_assert!(d >= step / 2 && d <= step, "delay {d} outside [{}, {step}]", step / 2);
            }
        }
    }
}
