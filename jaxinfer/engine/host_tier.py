"""Bookkeeping of the host-memory KV tier: which prefix hash each host slot holds.

Host Python only (the runner owns the memory; see kv_offload.py). A device page that leaves the
prefix cache by LRU eviction is copied to a host slot; a later request whose prefix hash is
found here gets a fresh device page and the slot is copied back into it before the step that
reads it. Slots are evicted least recently used first.

A slot written by an offload becomes readable only once the step that carries the offload has
been handed to the runner (`end_step`): the runner resolves a step's reloads against the slots
as they were before that step's offloads, so a reload planned in the same step would read the
slot's old bytes. The runner may also let a slot's memory go (`drop_slots`), which the engine
reports here before planning the next step.
"""

from __future__ import annotations

import collections


class HostTier:
    """Maps page hashes to host slots, with LRU eviction.

    Args:
      num_slots: pages the host pool holds (0 disables the tier).
    """

    def __init__(self, num_slots: int):
        if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 0:
            raise ValueError(f"num_slots must be a non-negative integer, got {num_slots!r}")
        self.num_slots = num_slots
        self._slot_of_hash: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # LRU first
        self._hash_of_slot: dict[int, bytes] = {}
        self._free_slots: collections.deque[int] = collections.deque(range(num_slots))
        self._pending: set[bytes] = set()  # stored in the step being planned: not readable yet

    def __len__(self) -> int:
        return len(self._slot_of_hash)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def items(self) -> list[tuple[bytes, int]]:
        """(hash, slot) pairs, least recently used first, pending ones included."""
        return list(self._slot_of_hash.items())

    def free_slots(self) -> list[int]:
        return list(self._free_slots)

    def lookup(self, digest: bytes) -> int | None:
        """The slot holding `digest`, if its bytes are readable (not written in this step)."""
        if digest in self._pending:
            return None
        return self._slot_of_hash.get(digest)

    def contains(self, digest: bytes) -> bool:
        return digest in self._slot_of_hash

    def touch(self, digest: bytes) -> None:
        """Marks the entry most recently used (it is about to be read)."""
        self._slot_of_hash.move_to_end(digest)

    def store(self, digest: bytes) -> int | None:
        """A slot for a page with hash `digest` that leaves the device, evicting the least recently
        used entry when full; None when the hash is already here or the tier has no slots."""
        if self.num_slots == 0:
            return None
        if digest in self._slot_of_hash:
            self._slot_of_hash.move_to_end(digest)
            return None
        if self._free_slots:
            slot = self._free_slots.popleft()
        else:
            evicted, slot = self._slot_of_hash.popitem(last=False)
            self._pending.discard(evicted)
        self._slot_of_hash[digest] = slot
        self._hash_of_slot[slot] = digest
        self._pending.add(digest)
        return slot

    def insert(self, digest: bytes) -> int | None:
        """A slot for a page with hash `digest` whose bytes the caller writes now, before the next
        step (a page moved in from elsewhere): readable at once, unlike `store`'s. None when the
        hash is already here or the tier has no slots."""
        slot = self.store(digest)
        if slot is not None:
            self._pending.discard(digest)
        return slot

    def drop_slots(self, slots) -> None:
        """Forgets the entries of `slots` (the runner let their memory go, see kv_offload.py):
        their hashes are no longer found and the slots are free again. Slots holding nothing
        are ignored."""
        for slot in slots:
            digest = self._hash_of_slot.pop(slot, None)
            if digest is None:
                continue
            del self._slot_of_hash[digest]
            self._pending.discard(digest)
            self._free_slots.append(slot)

    def end_step(self) -> None:
        """The step that carries this step's offloads has been handed out: they become readable."""
        self._pending.clear()
