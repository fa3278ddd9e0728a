//! An error and its whole `source()` chain on one line, the way every Carapace binary
//! reports a failure (logs, ttrpc status messages, stderr) — no dependencies, so the guest
//! agent, the VMM and the fs daemon can all use it.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its sources, joined by `": "`.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `e` and every error in its source chain, joined by `": "`.
pub fn chain(e: &dyn Error) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Leaf;
    impl fmt::Display for Leaf {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("no such file")
        }
    }
    impl Error for Leaf {}

    #[derive(Debug)]
    struct Wrap(&'static str, Box<dyn Error>);
    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(self.1.as_ref())
        }
    }

    #[test]
    fn every_source_follows_in_order() {
        let e = Wrap(
            "starting the VMM",
            Box::new(Wrap("reading vm.json", Box::new(Leaf))),
        );
        assert_eq!(chain(&e), "starting the VMM: reading vm.json: no such file");
        assert_eq!(chain(&Leaf), "no such file");
        assert_eq!(format!("{}", Chain(&e)), chain(&e));
    }
}
