/** Derived values remembered per key; forgets everything once it holds `max` entries. */
export class BoundedCache<K, V> {
  private readonly values = new Map<K, V>();

  constructor(private readonly max = 10_000) {}

  get(key: K, compute: (key: K) => V): V {
    let value = this.values.get(key);
    if (value === undefined) {
      value = compute(key);
      if (this.values.size >= this.max) this.values.clear();
      this.values.set(key, value);
    }
    return value;
  }
}
