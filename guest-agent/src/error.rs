//! Error text for people: the one helper that flattens an error and its causes.

/// `e` and every error in its `source()` chain, joined by ": ", as the host's ttrpc
/// statuses and the agent's logs show them.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("opening {path}")]
    struct Outer {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn every_cause_is_in_the_line() {
        let e = Outer {
            path: "/x",
            source: std::io::Error::other("disk on fire"),
        };
        assert_eq!(super::chain(&e), "opening /x: disk on fire");
        assert_eq!(super::chain(&std::io::Error::other("alone")), "alone");
    }
}
