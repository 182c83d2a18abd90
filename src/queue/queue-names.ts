/** The relay queues: one into Matrix, and one out to each protocol that has an account. */
export const TO_MATRIX_QUEUE = "to-matrix";

export function toConnectorQueue(connector: string): string {
  return `to-${connector}`;
}

/** The connectors that have at least one configured account: each has a `to-<connector>` queue. */
export function connectorsInUse<C extends { readonly name: string }>(
  accounts: readonly { readonly connector: string }[],
  connectors: readonly C[],
): C[] {
  return connectors.filter((c) => accounts.some((a) => a.connector === c.name));
}
