//! Graph permissions, as in QEMU's block layer.
//!
//! Every edge into a node (a parent node's child edge, or a BlockBackend)
//! states what it needs from the node (`perm`) and what it lets all other
//! users do at the same time (`shared`). A graph change is allowed only if,
//! on every node, each user's `perm` lies inside every other user's
//! `shared`. The `file` driver turns the cumulative result into image locks
//! so that the rule holds across processes too.

use std::fmt;

/// A set of permissions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u32);

impl Perm {
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// Reads return the image's real content (not a transient state).
    pub const CONSISTENT_READ: Perm = Perm(0x01);
    /// May change the visible content.
    pub const WRITE: Perm = Perm(0x02);
    /// May write data that does not change the content (copy-on-read).
    pub const WRITE_UNCHANGED: Perm = Perm(0x04);
    /// May change the size.
    pub const RESIZE: Perm = Perm(0x08);
    /// May change the graph below the node (QEMU dropped this bit in 6.x; it
    /// is kept here for the few operations that still reason about it).
    pub const GRAPH_MOD: Perm = Perm(0x10);
    /// Everything.
    pub const ALL: Perm = Perm(0x1f);

    /// The permissions that have lock bytes in image files, in bit order.
    pub const LOCKABLE: [Perm; 4] = [
        Perm::CONSISTENT_READ,
        Perm::WRITE,
        Perm::WRITE_UNCHANGED,
        Perm::RESIZE,
    ];

    /// Raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// Whether every bit of `other` is in `self`.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }
    /// Union.
    pub const fn union(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }
    /// Intersection.
    pub const fn intersect(self, other: Perm) -> Perm {
        Perm(self.0 & other.0)
    }
    /// `self` without the bits of `other`.
    pub const fn without(self, other: Perm) -> Perm {
        Perm(self.0 & !other.0)
    }
    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// QEMU's name for a single permission bit ("write", "consistent read").
    pub fn name(self) -> &'static str {
        match self {
            Perm::CONSISTENT_READ => "consistent read",
            Perm::WRITE => "write",
            Perm::WRITE_UNCHANGED => "write unchanged",
            Perm::RESIZE => "resize",
            Perm::GRAPH_MOD => "change children",
            _ => "permissions",
        }
    }

    /// The lowest set bit, e.g. to name the first conflicting permission.
    pub fn first(self) -> Option<Perm> {
        (self.0 != 0).then(|| Perm(1 << self.0.trailing_zeros()))
    }

    /// The names of all set bits, as QEMU lists them in query output.
    pub fn names(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut bits = self.0;
        while bits != 0 {
            let b = Perm(1 << bits.trailing_zeros());
            v.push(b.name());
            bits &= !b.0;
        }
        v
    }
}

impl std::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        self.union(rhs)
    }
}

impl std::ops::BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, rhs: Perm) -> Perm {
        self.intersect(rhs)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm({})", self.names().join("|"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_algebra() {
        let p = Perm::CONSISTENT_READ | Perm::WRITE;
        assert!(p.contains(Perm::WRITE));
        assert!(!p.contains(Perm::RESIZE));
        assert_eq!(p.without(Perm::WRITE), Perm::CONSISTENT_READ);
        assert_eq!(Perm::ALL.without(p).first(), Some(Perm::WRITE_UNCHANGED));
        assert_eq!(p.names(), vec!["consistent read", "write"]);
    }
}
