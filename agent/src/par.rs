//! Work cut in parts, each part on a thread of its own while the caller
//! waits (a burst of thousands of objects is read and translated on the
//! node's cores instead of one).

/// `f` of each part, in order, each on a scoped thread (the first on the
/// calling thread); None for a part whose thread could not start or
/// panicked. The threads have the agent's stack (`limits::thread`): a part
/// may parse a document nested as deep as the parser allows. In test builds
/// what the threads allocate and keep is counted as the caller's (see
/// `test_alloc::Account`), as if it had done the work itself.
pub fn each_part<P: Sync, R: Send>(parts: &[P], f: impl Fn(&P) -> R + Sync) -> Vec<Option<R>> {
    #[cfg(test)]
    let account = crate::test_alloc::Account::of_this_thread();
    let f = &f;
    std::thread::scope(|scope| {
        let rest: Vec<_> = parts
            .iter()
            .skip(1)
            .map(|p| {
                let work = move || f(p);
                #[cfg(test)]
                let work = move || account.lend(work);
                crate::limits::thread("weft-part").spawn_scoped(scope, work).ok()
            })
            .collect();
        let first = parts.first().map(f);
        first.into_iter().map(Some).chain(rest.into_iter().map(|h| h.and_then(|h| h.join().ok()))).collect()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_part_answers_in_order_and_counts_on_the_caller() {
        let parts: Vec<usize> = (1..=5).collect();
        let (out, held) = crate::test_alloc::held_after(|| super::each_part(&parts, |n| vec![*n as u8; *n * 1000]));
        let lens: Vec<usize> = out.iter().map(|v| v.as_ref().map_or(0, Vec::len)).collect();
        assert_eq!(lens, [1000, 2000, 3000, 4000, 5000]);
        assert!(held >= 15_000, "{held}");
        assert!(super::each_part(&[] as &[u8], |_| ()).is_empty());
    }
}
