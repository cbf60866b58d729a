//! The soak run for 60 s (CI's share; `scripts/soak.sh` runs it for 30 minutes): every churn
//! step converges to exactly etcd's leases, the stable hosts' pods lose no ping, and the stable
//! daemons' descriptors do not grow.

use std::time::Duration;

use testbed::soak::{run, SoakOptions};

#[test]
fn sixty_seconds_of_churn_without_drift_or_loss() {
    let opts = SoakOptions {
        hosts: 4,
        duration: Duration::from_secs(60),
        converge_timeout: Duration::from_secs(15),
    };
    let r = run(&opts, |line| eprintln!("{line}"));
    assert!(r.steps >= 6, "only {} steps in 60 s", r.steps);
    assert!(r.drift.is_empty(), "drift: {:#?}", r.drift);
    assert!(r.pings.0 >= 200, "pings {:?}", r.pings);
    assert_eq!(r.pings.0, r.pings.1, "pings lost between stable hosts");
    for (start, end) in r.fds {
        assert_eq!(start, end, "a stable flanneld's open descriptors changed");
    }
    eprintln!(
        "soak: {} steps, pings {:?}, RSS {:?} KiB, fds {:?}",
        r.steps, r.pings, r.rss_kib, r.fds
    );
}
