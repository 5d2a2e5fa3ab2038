/**
 * What the masters of a Redis Cluster say about their slots at one moment (each master's own line
 * of CLUSTER NODES), and which slots moved between two such moments. A SCAN of every master can
 * miss a key that a resharding MIGRATEs from a master not yet scanned to one already scanned; the
 * Redis backend lists those slots again, key by key, from the nodes they moved between.
 */

export const SLOTS = 16384;

export interface NodeAddress {
  host: string;
  port: number;
}

export interface SlotSnapshot {
  /** For each slot, the ids of the masters that claim it (more than one while a move completes). */
  claims: string[][];
  /** Slot → id of the node it is being migrated to (from the source's own line). */
  migrating: Map<number, string>;
  /** Slot → id of the node it is being imported from (from the target's own line). */
  importing: Map<number, string>;
  /** Node id → address, from every line seen. */
  addresses: Map<string, NodeAddress>;
}

/** Builds a snapshot from the CLUSTER NODES output of each master (its own "myself" line counts). */
export function parseSlotSnapshot(outputs: readonly string[]): SlotSnapshot {
  const snapshot: SlotSnapshot = { claims: Array.from({ length: SLOTS }, () => []), migrating: new Map(), importing: new Map(), addresses: new Map() };
  for (const output of outputs) {
    for (const line of output.split('\n')) {
      const fields = line.trim().split(' ');
      if (fields.length < 8) continue;
      const [id, address, flags] = fields;
      const hostPort = address.split('@')[0];
      const colon = hostPort.lastIndexOf(':');
      if (colon > 0) snapshot.addresses.set(id, { host: hostPort.slice(0, colon), port: Number(hostPort.slice(colon + 1)) });
      if (!flags.split(',').includes('myself')) continue;
      for (const field of fields.slice(8)) {
        const moving = /^\[(\d+)-([<>])-([0-9a-f]+)\]$/.exec(field);
        if (moving) {
          (moving[2] === '>' ? snapshot.migrating : snapshot.importing).set(Number(moving[1]), moving[3]);
          continue;
        }
        const [low, high = low] = field.split('-').map(Number);
        for (let slot = low; slot <= high && slot < SLOTS; slot += 1) snapshot.claims[slot].push(id);
      }
    }
  }
  return snapshot;
}

/** Whether every slot is claimed by some master in the snapshot (else a master was not asked). */
export function coversEverySlot(snapshot: SlotSnapshot): boolean {
  return snapshot.claims.every((ids) => ids.length > 0);
}

/**
 * The slots whose keys may have moved between the two snapshots, each with the nodes to read its
 * keys from, in the order keys move (source before target): a key that stays in the data set is
 * then read on one of them. Slots claimed by the same one master in both, with no migration in
 * either, are left out.
 */
export function movedSlots(before: SlotSnapshot, after: SlotSnapshot): Map<number, string[]> {
  const moved = new Map<number, string[]>();
  for (let slot = 0; slot < SLOTS; slot += 1) {
    const [was, is] = [before.claims[slot], after.claims[slot]];
    const still = was.length === 1 && is.length === 1 && was[0] === is[0];
    const migrating = [before, after].some((s) => s.migrating.has(slot) || s.importing.has(slot));
    if (still && !migrating) continue;
    const nodes = [
      ...was,
      ...[before.importing.get(slot), before.migrating.get(slot)],
      ...is,
      ...[after.importing.get(slot), after.migrating.get(slot)],
    ].filter((id): id is string => id !== undefined);
    moved.set(slot, [...new Set(nodes)]);
  }
  return moved;
}
