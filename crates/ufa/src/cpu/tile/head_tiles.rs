//! A thread's copy of one KV head's key tiles in the form a kernel family computes with
//! (transposed K in fp32, or K and V packed for the tile unit), kept for the thread's next
//! work items of the same head: a head's query rows are cut into several items, taken one
//! after another, and each would otherwise convert the same tiles again.

use super::super::aligned::{AlignedBuf, Plain};
use crate::problem::Problem;

/// Which tile a slot holds: (batch entry, KV head, keys in the tile). The keys tell a short
/// last tile from a whole one.
type Tag = (usize, usize, usize);

#[derive(Default)]
pub(crate) struct HeadTiles<T: Plain> {
    /// Slot `j0 / tile_keys` holds the tile of keys `j0..`, `slot_len` elements.
    data: AlignedBuf<T>,
    tags: Vec<Option<Tag>>,
    slot_len: usize,
    tile_keys: usize,
}

impl<T: Plain> HeadTiles<T> {
    /// Slots for one KV head's tiles of `tile_keys` keys, `slot_len` elements each, where the
    /// thread may take several items of a head (its queries, and those of the query heads
    /// that share it, exceed one item's `max_rows`) and the head's tiles fit in
    /// `budget_bytes`; otherwise none, and each item converts its tiles itself.
    pub fn slots_for(
        p: &Problem,
        max_rows: usize,
        tile_keys: usize,
        slot_len: usize,
        budget_bytes: usize,
    ) -> usize {
        let slots = p.seqlen_kv.div_ceil(tile_keys);
        let keep = p.seqlen_q * p.group_size() > max_rows
            && slots * slot_len * std::mem::size_of::<T>() <= budget_bytes;
        if keep {
            slots
        } else {
            0
        }
    }

    /// `slots` slots ([`HeadTiles::slots_for`]).
    pub fn new(slots: usize, tile_keys: usize, slot_len: usize) -> Self {
        HeadTiles {
            data: AlignedBuf::zeroed(slots * slot_len),
            tags: vec![None; slots],
            slot_len,
            tile_keys,
        }
    }

    pub fn elements(&self) -> usize {
        self.data.len()
    }

    /// Forgets every tile (the tags name a batch entry and head, not the call).
    #[inline(always)]
    pub fn clear(&mut self) {
        self.tags.fill(None);
    }

    /// The slot of the tile that starts at key `j0`, if it has one: tiles that start off the
    /// slots' boundaries (a band's first tile) are not kept.
    #[inline(always)]
    pub fn slot(&self, j0: usize) -> Option<usize> {
        let slot = j0 / self.tile_keys;
        (j0.is_multiple_of(self.tile_keys) && slot < self.tags.len()).then_some(slot)
    }

    /// The elements of `slot` for the caller to fill with the tile `tag` names, which the slot
    /// is then tagged with; None where it holds that tile already. (Not a method taking a
    /// closure to fill them: the kernels pack with intrinsics of their own target features,
    /// and a closure that was not inlined made them calls: bf16 W3 ran 8% slower so.)
    #[inline(always)]
    pub fn stale(&mut self, slot: usize, tag: Tag) -> Option<&mut [T]> {
        if self.tags[slot] == Some(tag) {
            return None;
        }
        self.tags[slot] = Some(tag);
        Some(&mut self.data[slot * self.slot_len..][..self.slot_len])
    }

    /// The elements of `slot`.
    #[inline(always)]
    pub fn get(&self, slot: usize) -> &[T] {
        &self.data[slot * self.slot_len..][..self.slot_len]
    }
}
