//! A byte trie of path prefixes, each node holding the routes (in config
//! order) whose prefix ends there.

use super::RouteId;

#[derive(Debug, Default)]
struct Node {
    /// Sorted by byte; paths branch little, so a short scan beats a map.
    children: Vec<(u8, u32)>,
    routes: Vec<RouteId>,
}

#[derive(Debug)]
pub struct Trie {
    nodes: Vec<Node>,
}

impl Default for Trie {
    fn default() -> Self {
        Trie {
            nodes: vec![Node::default()],
        }
    }
}

impl Trie {
    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 1 && self.nodes[0].routes.is_empty()
    }

    pub fn insert(&mut self, prefix: &[u8], id: RouteId) {
        let mut at = 0usize;
        for &b in prefix {
            let next = match self.nodes[at].children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => self.nodes[at].children[i].1 as usize,
                Err(i) => {
                    let n = self.nodes.len();
                    self.nodes.push(Node::default());
                    self.nodes[at].children.insert(i, (b, n as u32));
                    n
                }
            };
            at = next;
        }
        self.nodes[at].routes.push(id);
    }

    /// Calls `f` with the routes of every prefix of `path`, shortest first.
    /// Calls `f` with the routes of every prefix of `path`, shortest first.
    pub fn walk(&self, mut path: &[u8], mut f: impl FnMut(&[RouteId])) {
        let mut at = 0usize;
        loop {
            let node = &self.nodes[at];
            if !node.routes.is_empty() {
                f(&node.routes);
            }
            let Some((&b, rest)) = path.split_first() else {
                return;
            };
            match node.children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => at = node.children[i].1 as usize,
                Err(_) => return,
            }
            path = rest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_every_prefix() {
        let mut t = Trie::default();
        t.insert(b"", 9);
        t.insert(b"/a", 1);
        t.insert(b"/ab", 2);
        t.insert(b"/b", 3);
        let mut seen = vec![];
        t.walk(b"/abc", |ids| seen.extend_from_slice(ids));
        assert_eq!(seen, vec![9, 1, 2]);
        seen.clear();
        t.walk(b"/x", |ids| seen.extend_from_slice(ids));
        assert_eq!(seen, vec![9]);
    }
}
