"""pilothandshake: the Pilot Protocol trust handshake (port 444)."""
