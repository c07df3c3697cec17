//! The trust score: an EigenTrust variant over the contact graph, then a
//! penalty for upheld disputes and a percentile rank. Pure code: the caller loads the graph,
//! maps user ids to dense node indices `0..n` and back, and writes the results.
//!
//! **Graph.** Nodes are the active users; there is an edge u→v (weight 1) for each contact row
//! (owner u, contact v, u ≠ v). Self-loops and duplicate edges are dropped. The pre-trusted set
//! P is the verified nodes, or every node when none is verified; p is uniform over P.
//!
//! **Trust.** With C the row-normalised adjacency matrix and dangling nodes (no out-edges)
//! giving all their mass to p, start from t₀ = p and iterate
//! `t ← DAMPING · (Cᵀt + (Σ_dangling t)·p) + (1 − DAMPING) · p`
//! until ‖Δt‖₁ < [`EPSILON`] or [`MAX_ITERATIONS`] iterations. t sums to 1.
//!
//! **Score.** t′(u) = t(u) · [`PENALTY_BASE`]^min(k, [`MAX_PENALTY_DISPUTES`]) with k the disputes
//! against u upheld in the last 365 days, and `score(u) = ⌊1000 · #{w : t′(w) < t′(u)} / (N − 1)⌋`
//! (1000 when N = 1). Users with equal t′ get equal scores, so when everyone ties (a cycle),
//! nobody is strictly lower and everyone scores 0.
//!
//! # Determinism
//!
//! The iteration is a pull over a CSR of *incoming* edges: each `t_new[v]` is computed on its
//! own, so threads never share an accumulator. Every sum that mixes several nodes (the in-edge
//! sum of a node, the dangling mass, the L1 residual) is done in 60-bit fixed point on `u64`,
//! where addition is associative: the result is the same bits whatever the number of threads,
//! the order of nodes and the order of edges. Floating-point sums would not be: with them two
//! symmetric users could end up a few ulps apart, and "strictly lower" would rank them apart, or
//! the stop test could flip one iteration earlier under another labelling. The quantum of the
//! fixed point is 2⁻⁶⁰ ≈ 8.7·10⁻¹⁹, far below [`EPSILON`] spread over a million users.

use std::cmp::Ordering;

use rayon::prelude::*;

/// Recorded with each run so that scores computed by different rules can be told apart.
pub const ALGORITHM_VERSION: &str = "eigentrust-v1";
/// Weight of following the graph; the rest, `1 − DAMPING`, teleports to p.
pub const DAMPING: f64 = 0.85;
/// The iteration stops once ‖t_new − t‖₁ falls below this.
pub const EPSILON: f64 = 1e-10;
/// ... or after this many iterations, whichever comes first.
pub const MAX_ITERATIONS: u32 = 200;
/// Each upheld dispute multiplies the trust by this.
pub const PENALTY_BASE: f64 = 0.5;
/// Upheld disputes beyond this many do not lower the trust further.
pub const MAX_PENALTY_DISPUTES: u32 = 5;
/// The highest score; scores run from 0 to this.
pub const MAX_SCORE: i32 = 1000;

const TELEPORT: f64 = 1.0 - DAMPING;
/// 1.0 in the fixed point used for cross-node sums. Trust values are in [0, 1] and each of
/// these sums is at most ~2 (the residual), so 60 fractional bits leave 4 bits of headroom in
/// a `u64`.
const FIXED_ONE: f64 = (1u64 << 60) as f64;
/// Below this many items a parallel iterator stops splitting.
const MIN_PAR_LEN: usize = 4096;
/// Below this many edges a range of nodes has its in-lists sorted on one thread.
const MIN_PAR_EDGES: usize = 1 << 16;

/// `x ≥ 0` to fixed point, rounded to nearest.
#[inline]
fn to_fixed(x: f64) -> u64 {
    (x * FIXED_ONE + 0.5) as u64
}

#[inline]
fn from_fixed(x: u64) -> f64 {
    x as f64 / FIXED_ONE
}

/// The contact graph in the shape the iteration reads: for each node, the sorted, distinct
/// nodes that point to it (a CSR of the transpose), its out-degree and whether it is
/// pre-trusted. Build it with [`GraphBuilder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    /// `in_sources[in_offsets[v]..in_offsets[v + 1]]` are the nodes with an edge to v.
    in_offsets: Vec<usize>,
    in_sources: Vec<u32>,
    out_degree: Vec<u32>,
    pretrusted: Vec<bool>,
    pretrusted_count: usize,
}

impl Graph {
    /// N, the number of nodes (active users).
    pub fn node_count(&self) -> usize {
        self.out_degree.len()
    }

    /// The number of distinct edges, self-loops excluded.
    pub fn edge_count(&self) -> usize {
        self.in_sources.len()
    }

    /// The number of verified nodes. When it is 0, P is every node.
    pub fn verified_count(&self) -> usize {
        self.pretrusted_count
    }

    /// How many distinct nodes `node` points to.
    pub fn out_degree(&self, node: u32) -> u32 {
        self.out_degree[node as usize]
    }

    /// The distinct nodes that point to `node`, in increasing order.
    pub fn in_neighbours(&self, node: u32) -> &[u32] {
        let v = node as usize;
        &self.in_sources[self.in_offsets[v]..self.in_offsets[v + 1]]
    }

    /// The heap memory the graph holds, in bytes (capacities, not lengths).
    pub fn heap_bytes(&self) -> usize {
        self.in_offsets.capacity() * size_of::<usize>()
            + self.in_sources.capacity() * size_of::<u32>()
            + self.out_degree.capacity() * size_of::<u32>()
            + self.pretrusted.capacity() * size_of::<bool>()
    }

    /// p(v): uniform over the verified nodes, or over every node when none is verified.
    fn teleport_weights(&self) -> impl Fn(usize) -> f64 + Sync + '_ {
        let everyone = self.pretrusted_count == 0;
        let mass = 1.0 / if everyone { self.node_count() } else { self.pretrusted_count } as f64;
        move |v| if everyone || self.pretrusted[v] { mass } else { 0.0 }
    }
}

/// Collects nodes `0..node_count` and edges, then builds a [`Graph`]. The caller maps user ids
/// to these dense indices; neither the mapping nor the order of the edges changes the result.
#[derive(Debug, Clone, Default)]
pub struct GraphBuilder {
    node_count: usize,
    from: Vec<u32>,
    to: Vec<u32>,
    verified: Vec<bool>,
}

impl GraphBuilder {
    /// A builder for nodes `0..node_count`, none verified and no edges yet.
    ///
    /// # Panics
    /// If `node_count` does not fit in a `u32`.
    pub fn new(node_count: usize) -> Self {
        Self::with_edge_capacity(node_count, 0)
    }

    /// Like [`GraphBuilder::new`], with room for `edges` edges reserved up front.
    ///
    /// # Panics
    /// If `node_count` does not fit in a `u32`.
    pub fn with_edge_capacity(node_count: usize, edges: usize) -> Self {
        assert!(u32::try_from(node_count).is_ok(), "a score graph holds at most u32::MAX nodes, not {node_count}");
        Self {
            node_count,
            from: Vec::with_capacity(edges),
            to: Vec::with_capacity(edges),
            verified: vec![false; node_count],
        }
    }

    /// Marks `node` as verified, which puts it in the pre-trusted set P.
    ///
    /// # Panics
    /// If `node` is not below the node count.
    pub fn mark_verified(&mut self, node: u32) {
        self.verified[node as usize] = true;
    }

    /// Adds the edge `from → to` (from has to in its contacts). Self-loops and repeats are
    /// accepted here and dropped by [`GraphBuilder::build`].
    ///
    /// # Panics
    /// If either node is not below the node count.
    pub fn add_edge(&mut self, from: u32, to: u32) {
        let n = self.node_count;
        assert!((from as usize) < n && (to as usize) < n, "edge {from}→{to} is outside the graph's {n} nodes");
        self.from.push(from);
        self.to.push(to);
    }

    /// Builds the incoming-edge CSR: a counting sort by target, each in-list sorted, then
    /// self-loops and duplicates dropped. O(N + E), with E = the edges added.
    pub fn build(self) -> Graph {
        let Self { node_count: n, from, to, verified } = self;

        let mut in_offsets = vec![0usize; n + 1];
        for &v in &to {
            in_offsets[v as usize + 1] += 1;
        }
        for v in 0..n {
            in_offsets[v + 1] += in_offsets[v];
        }
        let mut in_sources = vec![0u32; from.len()];
        let mut cursor = in_offsets[..n].to_vec();
        for (&u, &v) in from.iter().zip(&to) {
            let slot = &mut cursor[v as usize];
            in_sources[*slot] = u;
            *slot += 1;
        }
        drop((cursor, from, to));

        sort_in_lists(&in_offsets, &mut in_sources);

        // Compact in place: each list is sorted, so repeats are adjacent. in_offsets[v] is
        // rewritten only after the old in_offsets[v] has been read as the previous list's end.
        let mut write = 0;
        let mut read_start = 0;
        for v in 0..n {
            let read_end = in_offsets[v + 1];
            in_offsets[v] = write;
            let mut previous = None;
            for read in read_start..read_end {
                let u = in_sources[read];
                if u as usize != v && previous != Some(u) {
                    in_sources[write] = u;
                    write += 1;
                }
                previous = Some(u);
            }
            read_start = read_end;
        }
        in_offsets[n] = write;
        in_sources.truncate(write);
        in_sources.shrink_to_fit();

        let mut out_degree = vec![0u32; n];
        for &u in &in_sources {
            out_degree[u as usize] += 1;
        }
        let pretrusted_count = verified.iter().filter(|&&v| v).count();
        Graph { in_offsets, in_sources, out_degree, pretrusted: verified, pretrusted_count }
    }
}

/// Sorts each node's in-list, splitting the node range across threads.
fn sort_in_lists(offsets: &[usize], sources: &mut [u32]) {
    // `offsets` covers a node range and its end; `sources` is exactly that range's edges.
    let nodes = offsets.len() - 1;
    if nodes <= 1 || sources.len() <= MIN_PAR_EDGES {
        let base = offsets[0];
        for w in offsets.windows(2) {
            sources[w[0] - base..w[1] - base].sort_unstable();
        }
        return;
    }
    let mid = nodes / 2;
    let (left, right) = sources.split_at_mut(offsets[mid] - offsets[0]);
    rayon::join(|| sort_in_lists(&offsets[..=mid], left), || sort_in_lists(&offsets[mid..], right));
}

/// The converged trust vector and how the iteration ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustResult {
    /// t(v) for each node, ≥ 0, summing to 1 (empty for an empty graph).
    pub trust: Vec<f64>,
    /// Iterations run, 1..=[`MAX_ITERATIONS`] (0 for an empty graph).
    pub iterations: u32,
    /// ‖Δt‖₁ of the last iteration: below [`EPSILON`] unless the iteration cap was hit.
    pub residual: f64,
}

/// Runs the trust iteration on rayon's current pool (install the call in a pool to bound its
/// threads). The result is bit-for-bit the same for any number of threads and any labelling
/// of nodes and order of edges; see the module docs.
pub fn compute_trust(graph: &Graph) -> TrustResult {
    let n = graph.node_count();
    if n == 0 {
        return TrustResult { trust: Vec::new(), iterations: 0, residual: 0.0 };
    }
    let p = graph.teleport_weights();
    let mut t: Vec<f64> = (0..n).into_par_iter().with_min_len(MIN_PAR_LEN).map(&p).collect();
    let mut next = vec![0.0f64; n];
    // t(u) / outdeg(u) in fixed point, what u sends along each of its edges.
    let mut share = vec![0u64; n];
    let mut iterations = 0;
    let mut residual = f64::INFINITY;

    while iterations < MAX_ITERATIONS {
        iterations += 1;

        let dangling_fixed: u64 = share
            .par_iter_mut()
            .zip(&t)
            .zip(&graph.out_degree)
            .with_min_len(MIN_PAR_LEN)
            .map(|((sent, &tu), &degree)| {
                if degree == 0 {
                    *sent = 0;
                    to_fixed(tu)
                } else {
                    *sent = to_fixed(tu / f64::from(degree));
                    0
                }
            })
            .sum();
        let dangling = from_fixed(dangling_fixed);

        let residual_fixed: u64 = next
            .par_iter_mut()
            .enumerate()
            .with_min_len(MIN_PAR_LEN)
            .map(|(v, out)| {
                let sources = &graph.in_sources[graph.in_offsets[v]..graph.in_offsets[v + 1]];
                let incoming: u64 = sources.iter().map(|&u| share[u as usize]).sum();
                let pv = p(v);
                *out = DAMPING * (from_fixed(incoming) + dangling * pv) + TELEPORT * pv;
                to_fixed((*out - t[v]).abs())
            })
            .sum();
        residual = from_fixed(residual_fixed);

        std::mem::swap(&mut t, &mut next);
        if residual < EPSILON {
            break;
        }
    }
    TrustResult { trust: t, iterations, residual }
}

/// t′ = t · [`PENALTY_BASE`]^k, with k the upheld disputes capped at [`MAX_PENALTY_DISPUTES`].
pub fn penalised_trust(trust: f64, upheld_disputes: u32) -> f64 {
    // k ≤ 5, so the cast is lossless and the factor an exact power of two.
    trust * PENALTY_BASE.powi(upheld_disputes.min(MAX_PENALTY_DISPUTES) as i32)
}

/// Scores from 0 to [`MAX_SCORE`]: `⌊1000 · #{w : t′(w) < t′(u)} / (N − 1)⌋`, 1000 when N = 1.
/// `trust[v]` and `upheld_disputes[v]` belong to node v. Equal t′ get equal scores. O(N log N).
///
/// # Panics
/// If the slices differ in length, or a trust value is negative or not finite.
pub fn scores(trust: &[f64], upheld_disputes: &[u32]) -> Vec<i32> {
    assert_eq!(trust.len(), upheld_disputes.len(), "one upheld-dispute count per trust value");
    let n = trust.len();
    match n {
        0 => return Vec::new(),
        1 => return vec![MAX_SCORE],
        _ => {}
    }
    let penalised: Vec<f64> = trust
        .par_iter()
        .zip(upheld_disputes)
        .with_min_len(MIN_PAR_LEN)
        .map(|(&t, &k)| {
            assert!(t.is_finite() && t >= 0.0, "trust must be finite and non-negative, got {t}");
            // `+ 0.0` turns −0.0 into +0.0, so that the total order below agrees with `<`.
            penalised_trust(t, k) + 0.0
        })
        .collect();

    let mut order: Vec<u32> = (0..n as u32).collect();
    order.par_sort_unstable_by(|&a, &b| penalised[a as usize].total_cmp(&penalised[b as usize]));

    let mut scores = vec![0i32; n];
    let denominator = n as u64 - 1;
    // Nodes strictly below the current run of equal values: the position where the run starts.
    let mut lower = 0usize;
    for (position, &node) in order.iter().enumerate() {
        if position > 0
            && penalised[order[position - 1] as usize].total_cmp(&penalised[node as usize]) != Ordering::Equal
        {
            lower = position;
        }
        // lower ≤ N − 1, so the quotient is at most 1000.
        scores[node as usize] = (MAX_SCORE as u64 * lower as u64 / denominator) as i32;
    }
    scores
}

/// An order-independent digest of a run's input: the active users (id, verified), the contact
/// edges between them and the upheld disputes counted against them. Two runs whose digests are
/// equal computed from the same input (up to a 64-bit hash collision), so a shadow candidate's
/// run is compared with the primary run of the same digest (`docs/workers/score-orchestrator.md`).
///
/// The digest is the wrapping sum of one 64-bit value per input element, so the order in which
/// rows arrive does not matter and no element is kept. Each value is the SplitMix64 finaliser
/// (a bijection on `u64`) of the element, salted by its kind. Edges and dispute counts are
/// hashed by the dense index of their users (the user's rank among the active users by id, as
/// the loader numbers them): equal user sets number users alike, and the user elements already
/// tell unequal sets apart. That keeps the per-edge cost at one multiply-xorshift chain on
/// values already in registers.
///
/// The value is stored (`score.runs.input_digest`, `shadow.score_runs.input_digest`) and compared
/// across processes and releases: this definition must not change without a new name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct InputDigest(u64);

impl InputDigest {
    // Random salts, one per kind of element, so that an edge and a dispute count over the same
    // numbers hash apart.
    const USER: u64 = 0x5be0_cd19_137e_2179;
    const EDGE: u64 = 0x1f83_d9ab_fb41_bd6b;
    const UPHELD: u64 = 0x9b05_688c_2b3e_6c1f;

    pub fn new() -> Self {
        Self(0)
    }

    /// An active user and whether they are verified.
    #[inline]
    pub fn add_user(&mut self, id: uuid::Uuid, verified: bool) {
        let (hi, lo) = id.as_u64_pair();
        let element = mix(mix(mix(hi ^ Self::USER) ^ lo) ^ u64::from(verified));
        self.0 = self.0.wrapping_add(element);
    }

    /// An edge `from → to` between the dense indices of two active users.
    #[inline]
    pub fn add_edge(&mut self, from: u32, to: u32) {
        let element = mix(((u64::from(from) << 32) | u64::from(to)) ^ Self::EDGE);
        self.0 = self.0.wrapping_add(element);
    }

    /// `count` upheld disputes (in the penalty window) against the user at dense index `node`.
    #[inline]
    pub fn add_upheld(&mut self, node: u32, count: u32) {
        let element = mix(((u64::from(node) << 32) | u64::from(count)) ^ Self::UPHELD);
        self.0 = self.0.wrapping_add(element);
    }

    pub fn value(self) -> u64 {
        self.0
    }

    /// The digest as PostgreSQL stores it (a `bigint`: the same 64 bits).
    pub fn as_i64(self) -> i64 {
        self.0 as i64
    }
}

/// The SplitMix64 finaliser (Steele, Lea and Flood 2014): every input bit affects every output
/// bit, and it is a bijection, so distinct elements of one kind never hash alike.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Where a score run stands (`score.runs.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Its lease holder is computing or writing it.
    Running,
    Succeeded,
    /// It failed, or its holder died and the next lease holder marked it.
    Failed,
}

impl RunStatus {
    pub const ALL: [RunStatus; 3] = [RunStatus::Running, RunStatus::Succeeded, RunStatus::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
        }
    }
}

/// A stored status (the store decodes rows with it).
impl TryFrom<String> for RunStatus {
    type Error = String;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        RunStatus::ALL.into_iter().find(|s| s.as_str() == raw).ok_or_else(|| format!("unknown run status {raw:?}"))
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn stored_run_statuses_convert_back() {
        for s in RunStatus::ALL {
            assert_eq!(RunStatus::try_from(s.as_str().to_owned()), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!(RunStatus::try_from("queued".to_owned()).is_err());
    }

    fn graph(n: usize, edges: &[(u32, u32)], verified: &[u32]) -> Graph {
        let mut builder = GraphBuilder::new(n);
        for &(u, v) in edges {
            builder.add_edge(u, v);
        }
        for &v in verified {
            builder.mark_verified(v);
        }
        builder.build()
    }

    fn assert_close(actual: &[f64], expected: &[f64]) {
        assert_eq!(actual.len(), expected.len());
        for (v, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!((a - e).abs() < 1e-9, "node {v}: got {a}, expected {e}");
        }
    }

    /// SplitMix64: a few lines of deterministic pseudo-randomness for the big graphs.
    struct SplitMix(u64);

    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> u32 {
            (self.next() % n as u64) as u32
        }
    }

    /// n nodes, m random edges (a few of them self-loops or repeats), about 1 in 10 verified.
    fn random_graph(n: usize, m: usize, seed: u64) -> Graph {
        let mut rng = SplitMix(seed);
        let mut builder = GraphBuilder::with_edge_capacity(n, m);
        for _ in 0..m {
            let (u, v) = (rng.below(n), rng.below(n));
            builder.add_edge(u, v);
        }
        for v in 0..n as u32 {
            if rng.below(10) == 0 {
                builder.mark_verified(v);
            }
        }
        builder.build()
    }

    #[test]
    fn a_three_cycle_gives_everyone_a_third_and_a_score_of_zero() {
        // 0→1→2→0, nobody verified: p = (1/3, 1/3, 1/3). Each node receives its predecessor's
        // whole 1/3, so t₁ = 0.85·1/3 + 0.15·1/3 = 1/3 = t₀: converged after one iteration.
        let result = compute_trust(&graph(3, &[(0, 1), (1, 2), (2, 0)], &[]));
        assert_close(&result.trust, &[1.0 / 3.0; 3]);
        assert_eq!(result.iterations, 1);
        assert!(result.residual < EPSILON);
        // All three t′ are the same bits, so nobody is strictly lower than anybody: 0 for all.
        assert_eq!(result.trust[0].to_bits(), result.trust[1].to_bits());
        assert_eq!(result.trust[1].to_bits(), result.trust[2].to_bits());
        assert_eq!(scores(&result.trust, &[0, 0, 0]), vec![0, 0, 0]);
    }

    #[test]
    fn the_centre_of_a_star_gets_the_most_trust() {
        // Centre 0 and leaves 1, 2, 3 with edges both ways; p = 1/4 each; no dangling node.
        // The centre splits its trust c over 3 leaves; each leaf sends its trust l to the centre.
        //   c = 0.85·3l + 0.15/4,  l = 0.85·c/3 + 0.15/4,  c + 3l = 1
        //   ⇒ c = 0.85·(1 − c) + 0.0375 ⇒ 1.85c = 0.8875 ⇒ c = 71/148 ≈ 0.4797
        //   ⇒ l = (1 − c)/3 = 77/444 ≈ 0.1734  (check: 0.85·71/444 + 0.0375 = 77/444).
        let edges = [(0, 1), (0, 2), (0, 3), (1, 0), (2, 0), (3, 0)];
        let result = compute_trust(&graph(4, &edges, &[]));
        assert_close(&result.trust, &[71.0 / 148.0, 77.0 / 444.0, 77.0 / 444.0, 77.0 / 444.0]);
        // N = 4: the centre has 3 strictly lower ⇒ ⌊1000·3/3⌋ = 1000; the leaves tie ⇒ 0.
        assert_eq!(scores(&result.trust, &[0; 4]), vec![1000, 0, 0, 0]);
    }

    #[test]
    fn a_dangling_node_gives_its_mass_to_p() {
        // Leaves 1, 2, 3 point to centre 0, which points nowhere; p = 1/4 each. The centre's
        // mass c is spread over p, c/4 to each node:
        //   c = 0.85·(3l + c/4) + 0.0375,  l = 0.85·c/4 + 0.0375,  c + 3l = 1
        //   ⇒ c + 3·(0.2125c + 0.0375) = 1 ⇒ 1.6375c = 0.8875 ⇒ c = 71/131 ≈ 0.5420
        //   ⇒ l = (1 − c)/3 = 20/131 ≈ 0.1527  (check: 0.2125·71/131 + 0.0375 = 20/131).
        let g = graph(4, &[(1, 0), (2, 0), (3, 0)], &[]);
        assert_eq!(g.out_degree(0), 0);
        let result = compute_trust(&g);
        assert_close(&result.trust, &[71.0 / 131.0, 20.0 / 131.0, 20.0 / 131.0, 20.0 / 131.0]);
        assert!((result.trust.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn with_nobody_verified_everyone_is_pre_trusted() {
        // 0→1, 1 dangling; nobody verified ⇒ p = (1/2, 1/2). With a = t(0), b = t(1):
        //   a = 0.85·b/2 + 0.075,  a + b = 1 ⇒ 1.425a = 0.5 ⇒ a = 20/57 ≈ 0.3509, b = 37/57
        //   (check: b = 0.85·(a + b/2) + 0.075 = 0.85·77/114 + 0.075 = 37/57).
        let result = compute_trust(&graph(2, &[(0, 1)], &[]));
        assert_close(&result.trust, &[20.0 / 57.0, 37.0 / 57.0]);
        assert_eq!(scores(&result.trust, &[0, 0]), vec![0, 1000]);
    }

    #[test]
    fn everyone_verified_is_the_same_as_nobody_verified() {
        let edges = [(0, 1), (1, 2), (2, 1), (3, 1)];
        let nobody = compute_trust(&graph(4, &edges, &[]));
        let everybody = compute_trust(&graph(4, &edges, &[0, 1, 2, 3]));
        assert_eq!(nobody, everybody);
    }

    #[test]
    fn verified_users_concentrate_p() {
        // The same 0→1 graph with only 0 verified ⇒ p = (1, 0); 1's dangling mass returns to 0:
        //   a = 0.85·b + 0.15,  b = 0.85·a ⇒ a = 0.7225a + 0.15 ⇒ a = 0.15/0.2775 = 20/37 ≈ 0.5405,
        //   b = 0.85·20/37 = 17/37 ≈ 0.4595. The verified user now ranks first.
        let result = compute_trust(&graph(2, &[(0, 1)], &[0]));
        assert_close(&result.trust, &[20.0 / 37.0, 17.0 / 37.0]);
        assert_eq!(scores(&result.trust, &[0, 0]), vec![1000, 0]);
    }

    #[test]
    fn without_edges_trust_is_p() {
        // Every node dangles, so t = 0.85·(0 + 1·p) + 0.15·p = p = (1, 0, 0, 0) with 0 verified.
        let result = compute_trust(&graph(4, &[], &[0]));
        assert_eq!(result.trust, vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(result.iterations, 1);
        // 0 has 3 strictly lower ⇒ 1000; the other three tie at 0 ⇒ 0.
        assert_eq!(scores(&result.trust, &[0; 4]), vec![1000, 0, 0, 0]);
    }

    #[test]
    fn self_loops_and_repeated_edges_are_dropped() {
        let messy = graph(3, &[(0, 1), (0, 1), (0, 0), (2, 2), (1, 2), (0, 1)], &[]);
        let clean = graph(3, &[(1, 2), (0, 1)], &[]);
        assert_eq!(messy, clean);
        assert_eq!(messy.edge_count(), 2);
        assert_eq!(messy.out_degree(0), 1);
        assert_eq!(messy.out_degree(2), 0);
        assert_eq!(messy.in_neighbours(1), &[0]);
    }

    #[test]
    fn one_upheld_dispute_halves_the_trust() {
        assert_eq!(penalised_trust(0.4, 1), 0.2);
        // t′ = (0.4·0.5, 0.3, 0.2, 0.1) = (0.2, 0.3, 0.2, 0.1); N − 1 = 3.
        //   node 1: 3 lower ⇒ 1000;  nodes 0 and 2 tie at 0.2, 1 lower (0.1) ⇒ ⌊1000/3⌋ = 333;
        //   node 3: nobody lower ⇒ 0.
        assert_eq!(scores(&[0.4, 0.3, 0.2, 0.1], &[1, 0, 0, 0]), vec![333, 1000, 333, 0]);
    }

    #[test]
    fn upheld_disputes_beyond_five_count_as_five() {
        // k = 7 is capped at 5: 0.64·0.5⁵ = 0.02, which sits between 0.0199 and 0.0201 ⇒ 1 lower
        // ⇒ ⌊1000·1/2⌋ = 500. Uncapped it would be 0.64·0.5⁷ = 0.005 ⇒ nobody lower ⇒ 0.
        assert_eq!(penalised_trust(0.64, 7), 0.02);
        assert_eq!(penalised_trust(0.64, 7), penalised_trust(0.64, 5));
        assert_eq!(scores(&[0.64, 0.0199, 0.0201], &[7, 0, 0]), vec![500, 0, 1000]);
        assert_eq!(scores(&[0.64, 0.0199, 0.0201], &[5, 0, 0]), vec![500, 0, 1000]);
        // One dispute fewer: 0.64·0.5⁴ = 0.04 is above both ⇒ 2 lower ⇒ 1000.
        assert_eq!(scores(&[0.64, 0.0199, 0.0201], &[4, 0, 0]), vec![1000, 0, 500]);
    }

    #[test]
    fn a_single_user_scores_1000() {
        let result = compute_trust(&graph(1, &[], &[]));
        assert_eq!(result.trust, vec![1.0]);
        assert_eq!(scores(&result.trust, &[0]), vec![1000]);
        // Even with disputes: N = 1 scores 1000 by definition.
        assert_eq!(scores(&result.trust, &[3]), vec![1000]);
    }

    #[test]
    fn an_empty_graph_has_no_trust_and_no_scores() {
        let result = compute_trust(&GraphBuilder::new(0).build());
        assert_eq!(result, TrustResult { trust: Vec::new(), iterations: 0, residual: 0.0 });
        assert_eq!(scores(&[], &[]), Vec::<i32>::new());
    }

    #[test]
    fn scores_run_from_0_to_1000_with_a_unique_top_at_1000() {
        // Five distinct values, N − 1 = 4: ranks 0..4 ⇒ ⌊1000·r/4⌋ = 0, 250, 500, 750, 1000.
        assert_eq!(scores(&[0.3, 0.1, 0.05, 0.4, 0.15], &[0; 5]), vec![750, 250, 0, 1000, 500]);
        // Seven distinct values, N − 1 = 6: ⌊1000·r/6⌋ = 0, 166, 333, 500, 666, 833, 1000.
        let trust = [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1];
        assert_eq!(scores(&trust, &[0; 7]), vec![1000, 833, 666, 500, 333, 166, 0]);
    }

    #[test]
    #[should_panic(expected = "one upheld-dispute count per trust value")]
    fn scores_refuse_mismatched_lengths() {
        scores(&[0.5, 0.5], &[0]);
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let g = random_graph(20_000, 200_000, 7);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| compute_trust(&g))
        };
        let one = run(1);
        let bits = |r: &TrustResult| r.trust.iter().map(|t| t.to_bits()).collect::<Vec<_>>();
        for threads in [2, 3] {
            let other = run(threads);
            assert_eq!(bits(&one), bits(&other), "{threads} threads");
            assert_eq!(one.iterations, other.iterations);
            assert_eq!(one.residual.to_bits(), other.residual.to_bits());
        }
    }

    #[test]
    fn a_large_random_graph_converges_well_before_the_cap() {
        let g = random_graph(200_000, 2_000_000, 42);
        let result = compute_trust(&g);
        assert!(result.iterations < MAX_ITERATIONS, "{} iterations", result.iterations);
        assert!(result.residual < EPSILON);
        assert!((result.trust.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    /// A random graph as raw parts: edges over nodes `0..n` (self-loops and repeats included),
    /// and per node its verified flag and upheld disputes.
    #[derive(Debug, Clone)]
    struct Parts {
        n: usize,
        edges: Vec<(u32, u32)>,
        verified: Vec<bool>,
        disputes: Vec<u32>,
    }

    impl Parts {
        fn graph(&self) -> Graph {
            let mut builder = GraphBuilder::new(self.n);
            for &(u, v) in &self.edges {
                builder.add_edge(u, v);
            }
            for (v, _) in self.verified.iter().enumerate().filter(|(_, verified)| **verified) {
                builder.mark_verified(v as u32);
            }
            builder.build()
        }
    }

    fn arb_parts() -> impl Strategy<Value = Parts> {
        (1usize..=60).prop_flat_map(|n| {
            let node = 0..n as u32;
            (
                prop::collection::vec((node.clone(), node), 0..=n * 5),
                prop::collection::vec(prop::bool::weighted(0.2), n),
                prop::collection::vec(0u32..=7, n),
            )
                .prop_map(move |(edges, verified, disputes)| Parts { n, edges, verified, disputes })
        })
    }

    #[test]
    fn the_input_digest_ignores_order_and_sees_every_element() {
        let ids: Vec<uuid::Uuid> = (1..=4u128).map(|i| uuid::Uuid::from_u128(i << 64 | i)).collect();
        let digest = |users: &[(usize, bool)], edges: &[(u32, u32)], upheld: &[(u32, u32)]| {
            let mut d = InputDigest::new();
            for &(i, verified) in users {
                d.add_user(ids[i], verified);
            }
            for &(from, to) in edges {
                d.add_edge(from, to);
            }
            for &(node, count) in upheld {
                d.add_upheld(node, count);
            }
            d.value()
        };
        let users = [(0, true), (1, false), (2, false), (3, true)];
        let base = digest(&users, &[(0, 1), (1, 2), (2, 0)], &[(3, 2)]);
        // Any order of users and rows: the same digest.
        let shuffled = [(3, true), (1, false), (0, true), (2, false)];
        assert_eq!(digest(&shuffled, &[(2, 0), (0, 1), (1, 2)], &[(3, 2)]), base);
        // Any change to any element: another digest.
        let others = [
            digest(&[(0, true), (1, true), (2, false), (3, true)], &[(0, 1), (1, 2), (2, 0)], &[(3, 2)]),
            digest(&users[..3], &[(0, 1), (1, 2), (2, 0)], &[(3, 2)]),
            digest(&users, &[(0, 1), (1, 2), (0, 2)], &[(3, 2)]),
            digest(&users, &[(0, 1), (1, 2)], &[(3, 2)]),
            digest(&users, &[(0, 1), (1, 2), (2, 0)], &[(3, 3)]),
            digest(&users, &[(0, 1), (1, 2), (2, 0)], &[]),
            // The same numbers as another kind of element.
            digest(&users, &[(0, 1), (1, 2), (2, 0), (3, 2)], &[]),
        ];
        for (i, other) in others.iter().enumerate() {
            assert_ne!(*other, base, "change {i}");
        }
        assert_eq!(InputDigest::new().value(), 0);
    }

    proptest! {
        #[test]
        fn trust_is_a_distribution(parts in arb_parts()) {
            let result = compute_trust(&parts.graph());
            prop_assert_eq!(result.trust.len(), parts.n);
            prop_assert!(result.trust.iter().all(|&t| t >= 0.0 && t.is_finite()));
            prop_assert!((result.trust.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            prop_assert!(result.iterations >= 1 && result.iterations <= MAX_ITERATIONS);

            let scores = scores(&result.trust, &parts.disputes);
            prop_assert!(scores.iter().all(|s| (0..=MAX_SCORE).contains(s)));
            if parts.n > 1 {
                // Whoever has the least t′ has nobody strictly lower; whoever alone has the most
                // has everybody else lower.
                let penalised: Vec<f64> =
                    result.trust.iter().zip(&parts.disputes).map(|(&t, &k)| penalised_trust(t, k)).collect();
                let least = penalised.iter().copied().fold(f64::INFINITY, f64::min);
                let most = penalised.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let top_count = penalised.iter().filter(|&&tp| tp == most).count();
                for (v, &tp) in penalised.iter().enumerate() {
                    if tp == least {
                        prop_assert_eq!(scores[v], 0);
                    }
                    if tp == most && top_count == 1 {
                        prop_assert_eq!(scores[v], MAX_SCORE);
                    }
                }
            }
        }

        #[test]
        fn relabelling_nodes_and_reordering_edges_changes_nothing(
            (parts, permutation, edge_order) in arb_parts().prop_flat_map(|parts| {
                let permutation = Just((0..parts.n as u32).collect::<Vec<_>>()).prop_shuffle();
                let edge_order = Just((0..parts.edges.len()).collect::<Vec<_>>()).prop_shuffle();
                (Just(parts), permutation, edge_order)
            })
        ) {
            // Node v of the original graph is node permutation[v] of the moved one.
            let relabel = |v: u32| permutation[v as usize];
            let mut moved = Parts {
                n: parts.n,
                edges: edge_order.iter().map(|&e| (relabel(parts.edges[e].0), relabel(parts.edges[e].1))).collect(),
                verified: vec![false; parts.n],
                disputes: vec![0; parts.n],
            };
            for (v, &w) in permutation.iter().enumerate() {
                moved.verified[w as usize] = parts.verified[v];
                moved.disputes[w as usize] = parts.disputes[v];
            }

            let original_trust = compute_trust(&parts.graph());
            let moved_trust = compute_trust(&moved.graph());
            prop_assert_eq!(original_trust.iterations, moved_trust.iterations);
            prop_assert_eq!(original_trust.residual.to_bits(), moved_trust.residual.to_bits());
            let original_scores = scores(&original_trust.trust, &parts.disputes);
            let moved_scores = scores(&moved_trust.trust, &moved.disputes);
            for (v, &w) in permutation.iter().enumerate() {
                let w = w as usize;
                // Fixed-point sums make this exact, stronger than the 1e-12 asked for.
                prop_assert_eq!(original_trust.trust[v].to_bits(), moved_trust.trust[w].to_bits(), "node {}", v);
                prop_assert_eq!(original_scores[v], moved_scores[w], "node {}", v);
            }
        }

        #[test]
        fn all_verified_equals_none_verified(parts in arb_parts()) {
            let none = Parts { verified: vec![false; parts.n], ..parts.clone() };
            let all = Parts { verified: vec![true; parts.n], ..parts };
            prop_assert_eq!(compute_trust(&none.graph()), compute_trust(&all.graph()));
        }
    }
}
