"""The fleetpush ops dashboard (Streamlit); it reads and steers the fleet only through core.client."""
