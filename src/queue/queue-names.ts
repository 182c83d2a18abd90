/** The relay queues: one into Matrix, and one out to each protocol that has an account. */
export const TO_MATRIX_QUEUE = "to-matrix";

export function toConnectorQueue(connector: string): string {
  return `to-${connector}`;
}
