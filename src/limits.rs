//! Limits that keep one client from taking the server: streaming connections
//! in total and per client IP, and a write rate per token (or per IP when
//! authentication is off). Body and frame sizes are limited where they are
//! read (`routes::orders::read_body`, the WebSocket stream).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The server holds its maximum number of streaming connections.
    Total,
    /// This client IP holds its maximum.
    PerIp,
}

/// Counts streaming connections (WebSocket + SSE).
#[derive(Debug)]
pub struct Connections {
    max_total: usize,
    max_per_ip: usize,
    // unwrap on lock: never held across a panic
    inner: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Held by a session; releases its slot when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    owner: Arc<Connections>,
    ip: IpAddr,
}

impl Connections {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Connections> {
        Arc::new(Connections { max_total, max_per_ip, inner: Mutex::new((0, HashMap::new())) })
    }

    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refused> {
        let ip = client_key(ip);
        let mut g = self.inner.lock().unwrap();
        if g.0 >= self.max_total {
            return Err(Refused::Total);
        }
        let n = g.1.entry(ip).or_default();
        if *n >= self.max_per_ip {
            return Err(Refused::PerIp);
        }
        *n += 1;
        g.0 += 1;
        Ok(ConnectionSlot { owner: self.clone(), ip })
    }

    pub fn open(&self) -> usize {
        self.inner.lock().unwrap().0
    }
}

/// What a client's connections (and, without authentication, its writes)
/// are counted under: its IPv4 address, or the /64 network of its IPv6
/// address (a host commonly holds a whole /64, and counting single addresses
/// would let it take the per-IP limits over and over). An IPv4-mapped IPv6
/// address counts as the IPv4 one.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut g = self.owner.inner.lock().unwrap();
        g.0 -= 1;
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
    }
}

/// Token buckets per caller: `rate` writes per second, bursts of `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    /// key -> (tokens, when counted); and when idle keys were last swept.
    buckets: Mutex<(Buckets, Instant)>,
}

type Buckets = HashMap<String, (f64, Instant)>;

/// Keys kept before idle ones are swept out, at most once a second.
const SWEEP_ABOVE: usize = 100_000;

impl RateLimiter {
    pub fn new(rate: f64, burst: f64) -> RateLimiter {
        RateLimiter { rate, burst: burst.max(1.0), buckets: Mutex::new((HashMap::new(), Instant::now())) }
    }

    /// The whole seconds until `key` may go on, if it has nothing left now;
    /// takes nothing from its bucket.
    pub fn blocked(&self, key: &str) -> Option<u64> {
        if self.rate <= 0.0 {
            return None;
        }
        let buckets = self.buckets.lock().unwrap();
        let (tokens, last) = buckets.0.get(key)?;
        let tokens = (tokens + last.elapsed().as_secs_f64() * self.rate).min(self.burst);
        (tokens < 1.0).then(|| ((1.0 - tokens) / self.rate).ceil().max(1.0) as u64)
    }

    /// Ok, or the number of whole seconds to wait before retrying.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut guard = self.buckets.lock().unwrap();
        let (buckets, swept) = &mut *guard;
        if buckets.len() > SWEEP_ABOVE && now.duration_since(*swept) >= std::time::Duration::from_secs(1) {
            // Forget callers whose bucket has filled up again (they are as
            // new ones) rather than grow without bound; once a second at
            // most, not at every call while the map is large.
            *swept = now;
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, t)| *tokens + now.duration_since(*t).as_secs_f64() * rate < burst);
        }
        let (tokens, last) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_are_counted_per_ip_and_released() {
        let c = Connections::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = c.acquire(a).unwrap();
        let _s2 = c.acquire(a).unwrap();
        assert_eq!(c.acquire(a).unwrap_err(), Refused::PerIp);
        let _s3 = c.acquire(b).unwrap();
        assert_eq!(c.acquire(b).unwrap_err(), Refused::Total);
        drop(s1);
        assert!(c.acquire(a).is_ok());
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64_network_and_a_mapped_ipv4_as_itself() {
        let c = Connections::new(10, 2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _a = c.acquire(ip("2001:db8:1:2::1")).unwrap();
        let _b = c.acquire(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(c.acquire(ip("2001:db8:1:2:abcd::1")).unwrap_err(), Refused::PerIp, "same /64");
        let other = c.acquire(ip("2001:db8:1:3::1")).unwrap();
        let _v4 = c.acquire(ip("192.0.2.7")).unwrap();
        let _mapped = c.acquire(ip("::ffff:192.0.2.7")).unwrap();
        assert_eq!(c.acquire(ip("192.0.2.7")).unwrap_err(), Refused::PerIp, "mapped counts as IPv4");
        drop(other);
        assert_eq!(c.open(), 4);
        assert!(c.inner.lock().unwrap().1.len() == 2, "released slots leave no entry");
    }

    #[test]
    fn the_write_rate_is_a_token_bucket() {
        let r = RateLimiter::new(1.0, 3.0);
        assert!((0..3).all(|_| r.check("k").is_ok()));
        assert_eq!(r.check("k"), Err(1));
        assert!(r.check("other").is_ok());
        assert!(RateLimiter::new(0.0, 1.0).check("k").is_ok());
    }

    #[test]
    fn keys_whose_bucket_filled_again_are_swept_once_the_map_is_large() {
        let r = RateLimiter::new(1000.0, 1.0);
        for i in 0..=SWEEP_ABOVE {
            assert!(r.check(&i.to_string()).is_ok());
        }
        assert_eq!(r.buckets.lock().unwrap().0.len(), SWEEP_ABOVE + 1, "not before a second has passed");
        std::thread::sleep(std::time::Duration::from_millis(1010));
        assert!(r.check("next").is_ok());
        assert_eq!(r.buckets.lock().unwrap().0.len(), 1, "every full bucket forgotten");
    }

    #[test]
    fn blocked_looks_without_taking() {
        let r = RateLimiter::new(1.0, 2.0);
        assert_eq!(r.blocked("k"), None, "an unknown key has its whole burst");
        assert!(r.check("k").is_ok());
        assert_eq!(r.blocked("k"), None);
        assert_eq!(r.blocked("k"), None, "looking takes nothing");
        assert!(r.check("k").is_ok());
        assert_eq!(r.blocked("k"), Some(1));
        assert_eq!(RateLimiter::new(0.0, 1.0).blocked("k"), None);
    }
}
