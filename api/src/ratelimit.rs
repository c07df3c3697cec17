//! Login rate limits, per login name and per client address (GCRA, in memory per replica).

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

pub struct LoginLimiter {
    per_login: DefaultKeyedRateLimiter<String>,
    per_address: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl LoginLimiter {
    /// Limits per minute; a burst of the full minute's allowance is accepted.
    pub fn new(per_login: u32, per_address: u32) -> Self {
        let quota = |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).expect("at least one"));
        Self {
            per_login: DefaultKeyedRateLimiter::keyed(quota(per_login)),
            per_address: DefaultKeyedRateLimiter::keyed(quota(per_address)),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(seconds to wait)` when either limit is exhausted. An attempt counts against both.
    pub fn check(&self, login: &str, address: IpAddr) -> Result<(), u64> {
        let now = self.clock.now();
        let by_address = self.per_address.check_key(&address);
        let by_login = self.per_login.check_key(&login.to_lowercase());
        let wait = [by_address.err(), by_login.err()]
            .into_iter()
            .flatten()
            .map(|not_until| not_until.wait_time_from(now))
            .max();
        match wait {
            Some(w) => Err(w.as_secs_f64().ceil().max(1.0) as u64),
            None => Ok(()),
        }
    }

    /// Forgets keys whose allowance has fully recovered, bounding memory.
    pub fn retain_recent(&self) {
        self.per_login.retain_recent();
        self.per_address.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eleventh_attempt_in_a_minute_is_refused() {
        let limiter = LoginLimiter::new(10, 100);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..10 {
            assert!(limiter.check("Alice", ip).is_ok());
        }
        let wait = limiter.check("alice", ip).unwrap_err();
        assert!((1..=6).contains(&wait), "waits {wait}s");
        assert!(limiter.check("bob", ip).is_ok(), "another login is not limited");
    }

    #[test]
    fn one_address_is_limited_across_logins() {
        let limiter = LoginLimiter::new(100, 3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for login in ["a", "b", "c"] {
            assert!(limiter.check(login, ip).is_ok());
        }
        assert!(limiter.check("d", ip).is_err());
        assert!(limiter.check("d", "10.0.0.2".parse().unwrap()).is_ok());
    }
}
