//! Which aggregator a node tries first, without a load balancer: rendezvous
//! (highest-random-weight) hashing. Each node scores every configured
//! aggregator by a hash of (node id, aggregator address) and tries them from
//! the highest score down. Nodes spread evenly; when an aggregator is added
//! or lost, only the nodes whose first choice it is (≈ 1/N of them) move,
//! and a lost aggregator's nodes spread over the others rather than all
//! landing on the next one in a list.

use xxhash_rust::xxh3::xxh3_64;

/// A node's score for one aggregator.
fn weight(node: &str, server: &str) -> u64 {
    let mut key = Vec::with_capacity(node.len() + server.len() + 1);
    key.extend_from_slice(node.as_bytes());
    // A separator no host name or node id holds: ("ab","c") ≠ ("a","bc").
    key.push(0xff);
    key.extend_from_slice(server.as_bytes());
    xxh3_64(&key)
}

/// `servers` in the order `node` tries them: highest weight first (ties,
/// which need equal hashes, keep the listed order).
pub fn rendezvous_order<S: AsRef<str> + Clone>(node: &str, servers: &[S]) -> Vec<S> {
    let mut scored: Vec<(u64, usize)> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| (weight(node, s.as_ref()), i))
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored
        .into_iter()
        .map(|(_, i)| servers[i].clone())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn first_choices(nodes: usize, servers: &[String]) -> Vec<String> {
        (0..nodes)
            .map(|n| rendezvous_order(&format!("gw-{n:05}"), servers)[0].clone())
            .collect()
    }

    fn servers(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("agg-{i}.example:7400")).collect()
    }

    /// 10,000 nodes over 3 aggregators: each holds a third, within 3 %; a
    /// fourth added takes ≈ 1/4 and moves nobody else; one lost moves only
    /// its own nodes, spread over the rest. Figures printed for the README.
    #[test]
    fn nodes_spread_evenly_and_about_one_in_n_move() {
        const NODES: usize = 10_000;
        let three = servers(3);
        let before = first_choices(NODES, &three);
        for s in &three {
            let held = before.iter().filter(|c| *c == s).count();
            println!("3 aggregators: {s} first choice of {held} nodes");
            assert!(held.abs_diff(NODES / 3) < NODES / 33, "{s}: {held}");
        }
        let four = servers(4);
        let after = first_choices(NODES, &four);
        let moved: Vec<usize> = (0..NODES).filter(|&i| before[i] != after[i]).collect();
        println!(
            "a 4th added: {} of {NODES} nodes move ({:.1} %, ideal 25 %)",
            moved.len(),
            100.0 * moved.len() as f64 / NODES as f64
        );
        assert!(
            moved.iter().all(|&i| after[i] == four[3]),
            "only to the new one"
        );
        assert!(moved.len().abs_diff(NODES / 4) < NODES / 40);
        let two = vec![three[0].clone(), three[2].clone()];
        let lost = first_choices(NODES, &two);
        let moved: Vec<usize> = (0..NODES).filter(|&i| before[i] != lost[i]).collect();
        println!(
            "{} lost: {} of {NODES} nodes move ({:.1} %, ideal 33.3 %)",
            three[1],
            moved.len(),
            100.0 * moved.len() as f64 / NODES as f64
        );
        assert!(moved.iter().all(|&i| before[i] == three[1]), "only its own");
        let to_first = moved.iter().filter(|&&i| lost[i] == two[0]).count();
        assert!(
            to_first.abs_diff(moved.len() / 2) < moved.len() / 10,
            "spread: {to_first}"
        );
    }

    #[test]
    fn the_order_is_a_permutation_and_stable() {
        let s = servers(5);
        let a = rendezvous_order("gw-1", &s);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, s);
        assert_eq!(a, rendezvous_order("gw-1", &s));
        assert_ne!(weight("ab", "c"), weight("a", "bc"));
    }
}
