//! Exponential backoff with jitter, pure: the caller supplies the randomness,
//! so tests and simulations are deterministic.

use std::time::Duration;

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
        let step = self
            .initial
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
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
